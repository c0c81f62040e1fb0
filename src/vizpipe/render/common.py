"""Shared matplotlib set-up: headless backend, reproducible files, safe file names."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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


FRAME_COLOR = "#8c8c8c"  # neutral grey frame around image tiles, visible on white and on black images
ROUND_STEPS = [1, 2, 2.5, 5, 10]  # tick steps of 1, 2, 2.5 or 5 times a power of ten


def add_colorbar(axis, mappable, label: str, extend: str = "neither"):
    """Draw a colour bar beside ``axis``, as tall as its drawn box, with round tick values.

    The bar is an inset of ``axis``: it follows the box after a fixed aspect ratio
    shrinks it, and constrained layout makes room for its tick labels. ``extend="max"``
    draws an arrow at the top, which marks values capped there. Contour levels keep
    their own data-derived values; only the tick positions are rounded.
    """
    bar_axis = axis.inset_axes([1.04, 0.0, 0.05, 1.0])
    colorbar = axis.get_figure().colorbar(mappable, cax=bar_axis, label=label, extend=extend)
    # "auto": as many ticks as the bar's length has room for, at most 9
    colorbar.set_ticks(MaxNLocator(nbins="auto", steps=ROUND_STEPS))
    colorbar.minorticks_off()
    return colorbar


def frame_axes(axis, color: str = FRAME_COLOR, linewidth: float = 0.6) -> None:
    """Hide ticks but keep a thin frame, so a white image still shows its edges on a white page."""
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(linewidth)


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
