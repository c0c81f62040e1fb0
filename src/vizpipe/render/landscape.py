"""Landscape figures: 1D curves; 2D contour, heatmap and 3D surface with the
trajectory overlaid for PCA directions; an interactive HTML surface."""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.ticker import MaxNLocator

from vizpipe.render.common import ROUND_STEPS, add_colorbar, save
from vizpipe.store import Results

log = logging.getLogger(__name__)

NUM_LEVELS = 25
# Camera elevation of the 3D surface in degrees, and the azimuths it picks from: each
# looks across a diagonal of the grid, from the corner between the two edges named.
SURFACE_ELEVATION = 55
SURFACE_VIEWS = ((-60, "x_max", "y_min"), (30, "x_max", "y_max"), (120, "x_min", "y_max"), (-150, "x_min", "y_min"))
TRAJECTORY_COLOR, START_COLOR, CENTRE_COLOR = "white", "#e69f00", "red"


def _display_loss(loss: np.ndarray, log_scale: bool, max_val: float | None) -> np.ma.MaskedArray:
    """Mask NaN/inf, cap at ``max_val`` and take log10 if asked: rendering only, never stored."""
    values = np.ma.masked_invalid(np.asarray(loss, dtype=np.float64))
    if max_val is not None:
        values = np.ma.minimum(values, max_val)
    if log_scale:
        values = np.ma.log10(np.ma.maximum(values, 1e-12))
    return values


def contour_levels(values: np.ma.MaskedArray, count: int = NUM_LEVELS) -> np.ndarray:
    """Evenly spaced levels over the finite values (a flat surface gets a small band around its value)."""
    low, high = float(values.min()), float(values.max())
    if not high > low:
        pad = max(abs(low) * 1e-6, 1e-12)
        low, high = low - pad, high + pad
    return np.linspace(low, high, count)


def _title_suffix(attrs: dict, done: np.ndarray) -> str:
    parts = [f"{attrs.get('kind', 'random')} directions"]
    if attrs.get("kind", "random") == "random":
        parts[0] = f"{attrs.get('normalization')}-normalized random directions"
    if attrs.get("num_samples") is not None:
        parts.append(f"{attrs.get('num_samples')} samples")
    if not done.all():
        parts.append(f"partial: {int(done.sum())} of {done.size} points")
    return ", ".join(parts)


@dataclass
class _Landscape:
    """A results file's landscape, prepared for drawing: masked, capped and log-scaled as requested."""

    group: dict
    attrs: dict
    loss: np.ma.MaskedArray
    accuracy: np.ma.MaskedArray
    done: np.ndarray
    label: str  # name of the loss axis or colour bar, with the cap when one applies
    capped: bool  # True when max_val lowered at least one evaluated loss value


def _prepare(results: Results, log_scale: bool | None, max_val: float | None) -> _Landscape:
    group = results["landscape"]
    attrs = results.group_attrs["landscape"]
    log_scale = bool(attrs.get("log_scale", False)) if log_scale is None else log_scale
    max_val = attrs.get("max_val") if max_val is None else max_val
    raw = np.asarray(group["loss"], dtype=np.float64)
    done = np.asarray(group.get("done", np.ones(raw.shape, dtype=bool)), dtype=bool)
    loss = _display_loss(raw, log_scale, max_val)
    loss[~done] = np.ma.masked
    accuracy = np.ma.masked_invalid(np.asarray(group["accuracy"], dtype=np.float64))
    accuracy[~done] = np.ma.masked
    evaluated = raw[done & np.isfinite(raw)]
    capped = max_val is not None and bool(np.any(evaluated > max_val))
    label = "log10 loss" if log_scale else "loss"
    if capped:
        label += f" (capped at {max_val:g})"
    return _Landscape(group, attrs, loss, accuracy, done, label, capped)


def landscape_figures(results: Results, log_scale: bool | None = None, max_val: float | None = None) -> dict:
    """Draw the landscape figures of a results file; return them by file stem, not yet saved.

    A 1D landscape gives ``landscape_line``; a 2D one gives ``landscape_contour``,
    ``landscape_heatmap`` and ``landscape_surface`` (none when an axis has fewer than 2 points).
    ``log_scale`` and ``max_val`` override the choices stored in the file.
    """
    view = _prepare(results, log_scale, max_val)
    if view.loss.ndim == 1:
        return {"landscape_line": _line_figure(view)}
    x, y = np.asarray(view.group["x"]), np.asarray(view.group["y"])
    if len(x) < 2 or len(y) < 2:
        log.warning("landscape has fewer than 2 points per axis; no contour or surface drawn")
        return {}
    return {
        "landscape_contour": _contour_figure(view, x, y),
        "landscape_heatmap": _heatmap_figure(view, x, y),
        "landscape_surface": _surface_figure(view, x, y),
    }


def render_landscape(results: Results, out: Path, formats, log_scale, max_val) -> list[Path]:
    written: list[Path] = []
    for stem, figure in landscape_figures(results, log_scale, max_val).items():
        written += save(figure, out, stem, formats)
    view = _prepare(results, log_scale, max_val)
    x, y = np.asarray(view.group["x"]), np.asarray(view.group.get("y", []))
    if view.loss.ndim == 2 and len(x) >= 2 and len(y) >= 2:
        written.append(_write_html_surface(x, y, view.loss, view.label, _axis_labels(view.group),
                                           out / "landscape_surface.html"))
    return written


def _line_figure(view: _Landscape):
    x = np.asarray(view.group["x"])
    target = view.attrs.get("kind") == "target"
    figure, loss_axis = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    loss_axis.plot(x, view.loss, color="#0072b2", marker="o", markersize=3, label=view.label)
    loss_axis.set_xlabel("alpha" if target else "direction 1")
    loss_axis.set_ylabel(view.label, color="#0072b2")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(x, view.accuracy, color="#d55e00", marker="s", markersize=3, linestyle="--", label="accuracy")
    accuracy_axis.set_ylabel("accuracy", color="#d55e00")
    for position in ((0.0, 1.0) if target else (0.0,)):
        loss_axis.axvline(position, color="grey", linewidth=0.6, linestyle=":")
    loss_axis.set_title(f"Loss along a line ({_title_suffix(view.attrs, view.done)})")
    return figure


def _contour_figure(view: _Landscape, x: np.ndarray, y: np.ndarray):
    trajectory = _trajectory(view.group)
    labels = _axis_labels(view.group)
    # The compressed layout removes the space a fixed aspect ratio leaves around the panels.
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.9), layout="compressed")
    panels = ((axes[0], view.loss, view.label, "viridis", view.capped), (axes[1], view.accuracy, "accuracy", "cividis", False))
    for axis, values, name, cmap, capped in panels:
        if values.count() == 0:
            axis.set_title(f"{name}: no finite values")
            continue
        levels = contour_levels(values)
        filled = axis.contourf(x, y, values, levels=levels, cmap=cmap, extend="max" if capped else "neither")
        axis.contour(x, y, values, levels=levels[::3], colors="k", linewidths=0.4, alpha=0.6)
        add_colorbar(axis, filled, name)
        _decorate(axis, trajectory, labels)
        axis.set_title(name)
    figure.suptitle(f"Loss landscape ({_title_suffix(view.attrs, view.done)})")
    _add_marker_legend(figure, axes[0], trajectory)
    return figure


def _heatmap_figure(view: _Landscape, x: np.ndarray, y: np.ndarray):
    trajectory = _trajectory(view.group)
    figure, axis = plt.subplots(figsize=(5, 4.4), layout="compressed")
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")  # diverged or not yet evaluated
    mesh = axis.pcolormesh(x, y, view.loss, cmap=cmap, shading="nearest")
    add_colorbar(axis, mesh, view.label, extend="max" if view.capped else "neither")
    _decorate(axis, trajectory, _axis_labels(view.group))
    # A figure title is centred over the panel and its colour bar together, so a long one cannot run under the bar.
    title = f"Loss heatmap ({_title_suffix(view.attrs, view.done)})"
    figure.suptitle("\n".join(textwrap.wrap(title, 75)), fontsize=9)
    _add_marker_legend(figure, axis, trajectory)
    return figure


def _surface_figure(view: _Landscape, x: np.ndarray, y: np.ndarray):
    labels = _axis_labels(view.group)
    figure = plt.figure(figsize=(5.5, 4.5))
    axis = figure.add_subplot(projection="3d")
    grid_x, grid_y = np.meshgrid(x, y)
    # One polygon per grid cell: the default of at most 50 rows and columns would skip grid points.
    axis.plot_surface(grid_x, grid_y, view.loss.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True,
                      rstride=1, cstride=1)
    axis.view_init(elev=SURFACE_ELEVATION, azim=_surface_azimuth(view.loss))
    for axis_ in (axis.xaxis, axis.yaxis, axis.zaxis):
        axis_.set_major_locator(MaxNLocator(nbins=4, steps=ROUND_STEPS))
    axis.tick_params(labelsize=7, pad=1)
    axis.set_xlabel(labels[0], labelpad=4)
    axis.set_ylabel(labels[1], labelpad=4)
    axis.set_zlabel(view.label, labelpad=4)
    axis.set_title("Loss surface")
    return figure


def _surface_azimuth(loss: np.ma.MaskedArray) -> float:
    """Pick the view whose near edges have the lowest mean loss.

    High walls then stand behind the minimum instead of hiding it, and matplotlib's
    painter's-algorithm drawing has no near wall to fold over the far side.
    """
    filled = loss.filled(np.nan)  # rows follow y, columns follow x
    edges = {"x_min": filled[:, 0], "x_max": filled[:, -1], "y_min": filled[0, :], "y_max": filled[-1, :]}
    best, best_mean = SURFACE_VIEWS[0][0], np.inf
    for azimuth, x_edge, y_edge in SURFACE_VIEWS:
        near = np.concatenate([edges[x_edge], edges[y_edge]])
        near = near[np.isfinite(near)]
        mean = float(near.mean()) if near.size else np.inf
        if mean < best_mean:
            best, best_mean = azimuth, mean
    return best


def _axis_labels(group) -> tuple[str, str]:
    if "explained_variance_ratio" in group:
        ratios = np.asarray(group["explained_variance_ratio"]).tolist() + [float("nan")]
        return f"PC 1 ({100 * ratios[0]:.1f}% of variance)", f"PC 2 ({100 * ratios[1]:.1f}% of variance)"
    return "direction 1", "direction 2"


def _trajectory(group) -> np.ndarray | None:
    """Return the training checkpoints' [N, 2] plane coordinates, or None when the file has none."""
    if "trajectory" not in group:
        return None
    trajectory = np.asarray(group["trajectory"], dtype=np.float64)
    return trajectory if trajectory.ndim == 2 and trajectory.shape[1] == 2 and len(trajectory) else None


def _ends_at_centre(trajectory: np.ndarray) -> bool:
    scale = max(float(np.abs(trajectory).max()), 1e-12)
    return bool(np.abs(trajectory[-1]).max() <= 1e-6 * scale)


def _decorate(axis, trajectory: np.ndarray | None, labels: tuple[str, str]) -> None:
    """Mark the centre and, for PCA directions, the training path with its start and end."""
    outline = [patheffects.withStroke(linewidth=2.2, foreground="black")]
    if trajectory is None:
        axis.plot(0, 0, marker="+", color=CENTRE_COLOR, markersize=10, linestyle="none")
    else:
        centre = "end of training (centre)" if _ends_at_centre(trajectory) else "centre"
        axis.plot(trajectory[:, 0], trajectory[:, 1], color=TRAJECTORY_COLOR, linewidth=1.2, marker="o", markersize=2.5,
                  path_effects=outline, label="training path (one dot per checkpoint)")
        axis.plot(trajectory[0, 0], trajectory[0, 1], marker="o", color=START_COLOR, markeredgecolor="black",
                  markersize=6, linestyle="none", label="start of training")
        if not _ends_at_centre(trajectory):
            axis.plot(trajectory[-1, 0], trajectory[-1, 1], marker="s", color=START_COLOR, markeredgecolor="black",
                      markersize=5, linestyle="none", label="end of training")
        axis.plot(0, 0, marker="+", color=CENTRE_COLOR, markersize=10, markeredgewidth=1.5, linestyle="none",
                  label=centre)
    axis.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=ROUND_STEPS))
    axis.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=ROUND_STEPS))
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_aspect("equal", adjustable="box")


def _add_marker_legend(figure, axis, trajectory: np.ndarray | None) -> None:
    """Explain the trajectory markers in one legend below the panels (nothing to explain without a trajectory)."""
    handles, names = axis.get_legend_handles_labels()
    if trajectory is None or not handles:
        return
    # A grey background keeps the white path line of the legend visible.
    figure.legend(handles, names, loc="outside lower center", ncol=len(handles), fontsize=7, facecolor="#d9d9d9",
                  framealpha=1.0)


def _write_html_surface(x, y, loss: np.ma.MaskedArray, label: str, labels: tuple[str, str], path: Path) -> Path:
    """Write an interactive 3D surface that MLflow's artifact view and any browser open.

    NOTE: the page loads plotly.js from its CDN (about 4 MB when embedded
    instead), so viewing it needs network access.
    """
    import plotly.graph_objects as go

    surface = go.Surface(x=x, y=y, z=loss.filled(np.nan), colorscale="Viridis", colorbar={"title": label})
    figure = go.Figure(surface)
    figure.update_layout(
        title="Loss surface",
        scene={"xaxis_title": labels[0], "yaxis_title": labels[1], "zaxis_title": label},
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    figure.write_html(path, include_plotlyjs="cdn", full_html=True, div_id="vizpipe-landscape")
    return path
