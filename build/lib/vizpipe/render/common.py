"""Shared matplotlib set-up: headless backend, reproducible files, safe file names."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

# No creation dates or software versions in the files, so the same results
# render to the same bytes.
_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "Creator": None, "Producer": None},
    "svg": {"Date": None, "Creator": None},
}

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "svg.hashsalt": "vizpipe",
}


def safe_name(name: str) -> str:
    """Turn a layer or parameter name into a file-name part that cannot leave its folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return cleaned or "unnamed"


def save(figure, out_dir: Path, stem: str, formats: list[str]) -> list[Path]:
    paths = []
    for extension in formats:
        path = out_dir / f"{safe_name(stem)}.{extension}"
        figure.savefig(path, metadata=_METADATA.get(extension), bbox_inches="tight")
        paths.append(path)
    plt.close(figure)
    return paths
