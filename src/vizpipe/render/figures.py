"""Render every figure a results file supports."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import matplotlib.pyplot as plt

from vizpipe.errors import VizpipeError
from vizpipe.render.activation_maximization import render_activation_maximization
from vizpipe.render.common import STYLE
from vizpipe.render.hessian import render_hessian
from vizpipe.render.kernels import render_kernels
from vizpipe.render.landscape import render_landscape
from vizpipe.render.training import render_training
from vizpipe.store import read_results

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("png", "pdf", "svg")
MANIFEST = ".manifest.json"  # in the figure folder: the files each results file's rendering wrote


def resolve_results_path(source: str | Path) -> Path:
    """Accept a results.h5 path or a run folder that contains one."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "results.h5"
    if not path.is_file():
        raise VizpipeError(f"results file not found: {path}; pass a results.h5 or the run folder that contains it")
    return path


def render_results(
    source: str | Path,
    out_dir: str | Path | None = None,
    formats: list[str] | tuple[str, ...] = ("png", "pdf"),
    log_scale: bool | None = None,
    max_val: float | None = None,
    kernel_normalize: str | None = None,
    hessian_symlog: bool | None = None,
) -> list[Path]:
    """Draw all figures for the analyses in a results file; return the written paths.

    ``out_dir`` defaults to ``figures/`` next to the results file. ``log_scale``,
    ``max_val`` and ``kernel_normalize`` override the rendering choices stored in
    the file. ``hessian_symlog`` forces the symmetric-log eigenvalue axis on or
    off (None: on when the values span more than two decades). GIFs of
    activation-maximization frames are written besides the requested formats.
    Files that an earlier call wrote for the same results file into ``out_dir``
    and that this call did not write again are deleted (see ``_remove_stale_figures``).
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in SUPPORTED_FORMATS]
    if unknown or not formats:
        raise VizpipeError(f"invalid figure formats {formats}; use any of {', '.join(SUPPORTED_FORMATS)}")
    path = resolve_results_path(source)
    results = read_results(path)
    out = Path(out_dir) if out_dir is not None else path.parent / "figures"
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    with plt.rc_context(STYLE):
        if "landscape" in results:
            written += render_landscape(results, out, formats, log_scale, max_val)
        if "hessian" in results:
            written += render_hessian(results, out, formats, hessian_symlog)
        if "conv_kernels" in results:
            written += render_kernels(results, out, formats, kernel_normalize)
        if "activation_maximization" in results:
            written += render_activation_maximization(results, out, formats)
        if "training" in results:
            written += render_training(results, out, formats)
    if not written:
        log.warning("%s contains no analysis results; no figure was drawn", path)
    _remove_stale_figures(out, path, written)
    return written


def _manifest_key(out: Path, results_path: Path) -> str:
    """Name a results file by its path relative to the figure folder, which survives moving both together."""
    return os.path.relpath(results_path.resolve(), out.resolve())


def _read_manifest(out: Path) -> dict[str, list[str]]:
    path = out / MANIFEST
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())["written"]
        valid = isinstance(entries, dict) and all(
            isinstance(names, list) and all(isinstance(name, str) for name in names) for names in entries.values()
        )
        if not valid:
            raise ValueError("'written' is not a mapping of results files to lists of file names")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("Ignoring unreadable figure manifest %s (%s); no stale figures removed", path, error)
        return {}
    return entries


def _remove_stale_figures(out: Path, results_path: Path, written: list[Path]) -> None:
    """Delete the files an earlier rendering of ``results_path`` wrote to ``out`` that this one did not write.

    ``out/.manifest.json`` lists, per results file, the names each rendering wrote.
    Only names listed there are removed, and only plain files directly inside ``out``
    that no other results file's entry lists, so files a user put there stay.
    """
    entries = _read_manifest(out)
    key = _manifest_key(out, results_path)
    current = sorted({path.name for path in written if path.parent.resolve() == out.resolve()})
    claimed = {name for other, names in entries.items() if other != key for name in names}
    stale = set(entries.get(key, [])) - set(current) - claimed
    removed = 0
    for name in sorted(stale):
        target = out / name
        # The manifest is a plain file anyone can edit: only bare names of plain files are honoured.
        if name in ("", ".", "..", MANIFEST) or Path(name).name != name:
            continue
        if target.is_symlink() or not target.is_file():
            continue
        target.unlink()
        removed += 1
    if removed:
        log.info("Removed %d figure files an earlier rendering of %s wrote to %s", removed, results_path, out)

    entries[key] = current
    temporary = out / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps({"written": entries}, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, out / MANIFEST)
