"""Per-parameter Hessian eigenvalue bar chart."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)


def render_hessian(results: Results, out: Path, formats) -> list[Path]:
    group = results["hessian"]
    names = list(group["parameter_names"])
    values = np.asarray(group["eigenvalues"], dtype=np.float64)
    converged = np.asarray(group["converged"], dtype=bool)
    figure, axis = plt.subplots(figsize=(6.5, 0.6 + 0.22 * len(names)), constrained_layout=True)
    colors = np.where(values < 0, "#d55e00", "#0072b2")
    positions = np.arange(len(names))
    axis.barh(positions, values, color=colors, edgecolor=["none" if ok else "k" for ok in converged], hatch=None)
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > 0:
        axis.set_xscale("symlog", linthresh=max(np.abs(finite).max() * 1e-3, 1e-12))
    axis.axvline(0, color="k", linewidth=0.6)
    axis.set_xlabel("dominant eigenvalue of the parameter's Hessian block")
    not_converged = int((~converged).sum())
    title = f"Per-parameter Hessian eigenvalues ({results.group_attrs['hessian'].get('method')})"
    if not_converged:
        title += f"; {not_converged} not converged (outlined)"
    axis.set_title(title)
    return save(figure, out, "hessian_eigenvalues", formats)


