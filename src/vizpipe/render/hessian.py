"""Hessian figures: per-block eigenvalue bars, convergence curves and the eigenvalue density."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)

POSITIVE, NEGATIVE = "#0072b2", "#d55e00"  # colour-blind safe blue and vermillion


def render_hessian(results: Results, out: Path, formats, symlog: bool | None = None) -> list[Path]:
    """Draw every Hessian figure the results file supports.

    ``symlog`` sets a symmetric-log eigenvalue axis; None picks it when the
    absolute values span more than two decades.
    """
    group = results["hessian"]
    written: list[Path] = []
    if "eigenvalues" in group:
        written += render_block_eigenvalues(results, out, formats, symlog)
        written += render_convergence(results, out, formats)
    if "density" in group:
        written += render_density(results, out, formats)
    return written


def _names(group: dict) -> list[str]:
    return list(group["block_names"] if "block_names" in group else group["parameter_names"])


def _wants_symlog(values: np.ndarray) -> bool:
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    return magnitudes.size > 1 and magnitudes.max() > 100 * magnitudes.min()


def render_block_eigenvalues(results: Results, out: Path, formats, symlog: bool | None = None) -> list[Path]:
    group = results["hessian"]
    attrs = results.group_attrs["hessian"]
    names = _names(group)
    values = np.asarray(group["eigenvalues"], dtype=np.float64)
    converged = np.asarray(group["converged"], dtype=bool)
    smallest = np.asarray(group.get("smallest", np.full(len(names), np.nan)), dtype=np.float64)

    figure, axis = plt.subplots(figsize=(6.5, 0.8 + 0.22 * len(names)), constrained_layout=True)
    positions = np.arange(len(names))
    colors = np.where(values < 0, NEGATIVE, POSITIVE)
    hatches = [None if value >= 0 else "//" for value in values]
    bars = axis.barh(positions, values, color=colors, edgecolor=["none" if ok else "k" for ok in converged])
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    if np.isfinite(smallest).any():
        axis.scatter(smallest, positions, marker="|", s=90, color="k", zorder=3, label="smallest algebraic")
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    shown = np.concatenate([values, smallest])
    if symlog if symlog is not None else _wants_symlog(shown):
        finite = np.abs(shown[np.isfinite(shown)])
        # a linear range of 1e-4 times the largest value keeps near-zero eigenvalues from adding empty decades
        axis.set_xscale("symlog", linthresh=max(finite.max() * 1e-4, 1e-30) if finite.size else 1.0)
    axis.axvline(0, color="k", linewidth=0.6)
    axis.set_xlabel(f"dominant eigenvalue of the {attrs.get('group_by', 'parameter')}'s Hessian block")
    handles = [Patch(color=POSITIVE, label="positive"), Patch(facecolor=NEGATIVE, hatch="//", label="negative")]
    if np.isfinite(smallest).any():
        handles += axis.get_legend_handles_labels()[0]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    title = f"Per-block Hessian eigenvalues ({attrs.get('method')})"
    not_converged = int((~converged).sum())
    if not_converged:
        title += f"; {not_converged} not converged (outlined)"
    axis.set_title(title)
    return save(figure, out, "hessian_eigenvalues", formats)


def render_convergence(results: Results, out: Path, formats) -> list[Path]:
    """Plot each block's relative distance to its final estimate against the product count."""
    group = results["hessian"]
    names = _names(group)
    history = np.asarray(group["history"], dtype=np.float64)
    figure, axis = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for name, row in zip(names, history):
        used = row[np.isfinite(row)]
        if used.size < 2 or used[-1] == 0:
            continue
        # the last estimate is the reference, so the curve ends before it
        error = np.abs(used[:-1] - used[-1]) / abs(used[-1])
        steps = np.arange(1, used.size)
        axis.semilogy(steps, np.maximum(error, 1e-17), linewidth=0.8, label=name)
    tol = results.group_attrs["hessian"].get("tol")
    if tol:
        axis.axhline(tol, color="k", linestyle="--", linewidth=0.6, label="tol")
    axis.set_xlabel("Hessian-vector products")
    axis.set_ylabel("relative distance to the final estimate")
    attrs = results.group_attrs["hessian"]
    title = "Convergence per block"
    if attrs.get("method") == "power_iteration" and attrs.get("which") == "extremes":
        title += " (both phases: dominant, then the other end of the spectrum)"
    axis.set_title(title)
    if len(names) <= 30:
        axis.legend(fontsize=6, ncol=2)
    return save(figure, out, "hessian_convergence", formats)


def render_density(results: Results, out: Path, formats) -> list[Path]:
    density_group = results["hessian"]["density"]
    grid = np.asarray(density_group["grid"], dtype=np.float64)
    density = np.asarray(density_group["density"], dtype=np.float64)
    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    positive = density > 0
    axis.semilogy(grid[positive], density[positive], color=POSITIVE)
    floor = density[positive].max() * 1e-8 if positive.any() else 1e-12
    axis.set_ylim(bottom=floor)
    axis.axvline(0, color="k", linewidth=0.6)
    if "trace" in results["hessian"]:
        trace_attrs = results.group_attrs["hessian/trace"]
        count = results.group_attrs["hessian/density"]["num_parameters"]
        axis.axvline(trace_attrs["trace"] / count, color=NEGATIVE, linestyle="--", linewidth=0.8,
                     label="trace / n (Hutchinson)")
        axis.legend(fontsize=7)
    axis.set_xlabel("eigenvalue")
    axis.set_ylabel("density (log scale)")
    axis.set_title("Hessian eigenvalue density (stochastic Lanczos quadrature)")
    return save(figure, out, "hessian_density", formats)
