"""Hessian figures: per-block eigenvalue bars, convergence curves and the eigenvalue density."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import offset_copy

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)

POSITIVE, NEGATIVE = "#0072b2", "#d55e00"  # colour-blind safe blue and vermillion
DISAGREE = "#cc79a7"  # reddish purple of the same palette (Okabe and Ito)
LEGEND_BLOCKS = 10  # convergence curves beyond this many share a colormap instead of a legend
LABELLED_BLOCKS = 3  # with a colormap, the curves named at their end


def hessian_figures(results: Results, symlog: bool | None = None) -> dict:
    """Draw every Hessian figure the results file supports; return them by file stem, not yet saved.

    ``symlog`` sets a symmetric-log eigenvalue axis; None picks it when the
    absolute values span more than two decades.
    """
    group = results["hessian"]
    figures = {}
    if "eigenvalues" in group:
        figures["hessian_eigenvalues"] = block_eigenvalues_figure(results, symlog)
        figures["hessian_convergence"] = convergence_figure(results)
    if "density" in group:
        figures["hessian_density"] = density_figure(results)
    return figures


def render_hessian(results: Results, out: Path, formats, symlog: bool | None = None) -> list[Path]:
    written: list[Path] = []
    for stem, figure in hessian_figures(results, symlog).items():
        written += save(figure, out, stem, formats)
    return written


def _names(group: dict) -> list[str]:
    return list(group["block_names"] if "block_names" in group else group["parameter_names"])


def _wants_symlog(values: np.ndarray) -> bool:
    magnitudes = np.abs(values[np.isfinite(values) & (values != 0)])
    return magnitudes.size > 1 and magnitudes.max() > 100 * magnitudes.min()


def block_eigenvalues_figure(results: Results, symlog: bool | None = None):
    group = results["hessian"]
    attrs = results.group_attrs["hessian"]
    names = _names(group)
    values = np.asarray(group["eigenvalues"], dtype=np.float64)
    converged = np.asarray(group["converged"], dtype=bool)
    smallest = np.asarray(group.get("smallest", np.full(len(names), np.nan)), dtype=np.float64)
    # present when the job verified each block from a second start
    by_start = np.asarray(group.get("eigenvalues_by_start", np.full((len(names), 2), np.nan)), dtype=np.float64)
    # the start whose value is not the bar's: at the bar's end when the two agree
    other = np.where(by_start[:, 0] == values, by_start[:, 1], by_start[:, 0])
    disagree = np.asarray(group.get("disagree", np.zeros(len(names), dtype=bool)), dtype=bool)

    figure, axis = plt.subplots(figsize=(6.5, 0.8 + 0.22 * len(names)), constrained_layout=True)
    positions = np.arange(len(names))
    colors = np.where(values < 0, NEGATIVE, POSITIVE)
    hatches = [None if value >= 0 else "//" for value in values]
    bars = axis.barh(positions, values, color=colors, edgecolor=["none" if ok else "k" for ok in converged])
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
    if np.isfinite(smallest).any():
        axis.scatter(smallest, positions, marker="|", s=90, color="k", zorder=3, label="smallest algebraic")
    if np.isfinite(other).any():
        # clip_on=False keeps a marker at the axis edge whole
        for rows, color, label in ((~disagree, "k", "other start"), (disagree, DISAGREE, "other start, disagrees")):
            if rows.any():
                axis.scatter(other[rows], positions[rows], marker="x", s=20, color=color, linewidths=0.8, zorder=3,
                             clip_on=False, label=label)
    axis.set_yticks(positions, names)
    for label, flagged in zip(axis.get_yticklabels(), disagree):
        if flagged:
            label.set_color(DISAGREE)
    axis.invert_yaxis()
    shown = np.concatenate([values, smallest, other])
    if symlog if symlog is not None else _wants_symlog(shown):
        finite = np.abs(shown[np.isfinite(shown)])
        # a linear range of 1e-4 times the largest value keeps near-zero eigenvalues from adding empty decades
        axis.set_xscale("symlog", linthresh=max(finite.max() * 1e-4, 1e-30) if finite.size else 1.0)
    axis.axvline(0, color="k", linewidth=0.6)
    axis.set_xlabel(f"dominant eigenvalue of the {attrs.get('group_by', 'parameter')}'s Hessian block")
    handles = []
    if (values < 0).any():  # with one sign only, the colours need no key
        handles += [Patch(color=POSITIVE, label="positive"), Patch(facecolor=NEGATIVE, hatch="//", label="negative")]
    handles += axis.get_legend_handles_labels()[0]  # the markers drawn above
    if handles:
        axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    title = f"Per-block Hessian eigenvalues ({attrs.get('method')})"
    not_converged = int((~converged).sum())
    if not_converged:
        title += f"; {not_converged} not converged (outlined)"
    if disagree.any():
        title += f"; starts disagree on {int(disagree.sum())} (names in colour)"
    axis.set_title(title)
    return figure


def convergence_figure(results: Results):
    """Plot each block's relative distance to its final estimate against the product count.

    Up to ``LEGEND_BLOCKS`` blocks get distinct colours and a legend beside the axes.
    More blocks are coloured by their position in the model, keyed by a colour bar,
    and the ``LABELLED_BLOCKS`` slowest to converge get their name at the end of their curve.
    """
    group = results["hessian"]
    attrs = results.group_attrs["hessian"]
    names = _names(group)
    history = np.asarray(group["history"], dtype=np.float64)
    curves = []  # (block index, products, relative distance)
    for index, row in enumerate(history):
        used = row[np.isfinite(row)]
        if used.size < 2 or used[-1] == 0:
            continue
        # the last estimate is the reference, so the curve ends before it
        error = np.abs(used[:-1] - used[-1]) / abs(used[-1])
        curves.append((index, np.arange(1, used.size), np.maximum(error, 1e-17)))

    figure, axis = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    many = len(curves) > LEGEND_BLOCKS
    # viridis without its palest yellows, which are hard to see as thin lines on white
    colormap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0.0, 0.85, 256)))
    norm = Normalize(vmin=0, vmax=max(len(names) - 1, 1))
    for position, (index, steps, error) in enumerate(curves):
        color = colormap(norm(index)) if many else plt.get_cmap("tab10")(position)
        axis.semilogy(steps, error, linewidth=0.8, color=color, label=names[index])
    tol = attrs.get("tol")
    if tol:
        axis.axhline(tol, color="k", linestyle="--", linewidth=0.6, label="tol")
    axis.set_xlabel("Hessian-vector products")
    axis.set_ylabel("relative distance to the final estimate")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = "Convergence per block"
    if attrs.get("method") == "power_iteration" and attrs.get("which") == "extremes":
        title += "\n(both phases: dominant, then the other end of the spectrum)"
    axis.set_title(title)
    if not many:
        if curves or tol:
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        return figure

    colorbar = figure.colorbar(ScalarMappable(norm=norm, cmap=colormap), ax=axis, pad=0.02)
    ticks = MaxNLocator(nbins=6, integer=True).tick_values(0, len(names) - 1)
    ticks = [int(tick) for tick in ticks if 0 <= tick <= len(names) - 1]
    colorbar.set_ticks(ticks, labels=[f"{tick}: {names[tick]}" for tick in ticks], fontsize=6)
    colorbar.set_label("block, in model order")
    slowest = sorted(curves, key=lambda curve: (-curve[1][-1], -curve[2][-1]))[:LABELLED_BLOCKS]
    ends = [np.log10(error[-1]) for _, _, error in slowest]
    low, high = np.log10(axis.get_ylim())
    beside = offset_copy(axis.transData, figure, x=3, units="points")
    for (index, steps, error), height in zip(slowest, _spread(ends, 0.05 * (high - low))):
        axis.text(steps[-1], 10**height, names[index], transform=beside, fontsize=6, va="center", ha="left")
    if tol:
        axis.annotate("tol", (0, tol), xycoords=("axes fraction", "data"), xytext=(2, 2),
                      textcoords="offset points", ha="left", va="bottom", fontsize=7)
    return figure


def _spread(positions: list[float], gap: float) -> list[float]:
    """Return label positions moved up until neighbours are at least ``gap`` apart, in the input order."""
    order = np.argsort(positions, kind="stable")
    moved = np.asarray(positions, dtype=np.float64)[order]
    for i in range(1, len(moved)):
        moved[i] = max(moved[i], moved[i - 1] + gap)
    result = np.empty_like(moved)
    result[order] = moved
    return result.tolist()


def density_figure(results: Results):
    density_group = results["hessian"]["density"]
    grid = np.asarray(density_group["grid"], dtype=np.float64)
    density = np.asarray(density_group["density"], dtype=np.float64)
    figure, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    positive = density > 0
    axis.semilogy(grid[positive], density[positive], color=POSITIVE)
    if positive.any():
        # eight decades below the peak; autoscaling to that floor would add decades of margin above the peak
        axis.set_ylim(density[positive].max() * 1e-8, density[positive].max() * 3)
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
    return figure
