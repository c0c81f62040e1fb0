"""Render every figure a results file supports."""

from __future__ import annotations

import logging
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
    return written
