"""Landscape figures: 1D curves; 2D contour, heatmap and 3D surface with the
trajectory overlaid for PCA directions; an interactive HTML surface."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)

NUM_LEVELS = 25


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


def render_landscape(results: Results, out: Path, formats, log_scale, max_val) -> list[Path]:
    group = results["landscape"]
    attrs = results.group_attrs["landscape"]
    log_scale = bool(attrs.get("log_scale", False)) if log_scale is None else log_scale
    max_val = attrs.get("max_val") if max_val is None else max_val
    done = np.asarray(group.get("done", np.ones(np.shape(group["loss"]), dtype=bool)), dtype=bool)
    loss = _display_loss(group["loss"], log_scale, max_val)
    loss[~done] = np.ma.masked
    accuracy = np.ma.masked_invalid(np.asarray(group["accuracy"], dtype=np.float64))
    accuracy[~done] = np.ma.masked
    label = "log10 loss" if log_scale else "loss"
    if loss.ndim == 1:
        return _render_line(group, attrs, loss, accuracy, done, label, out, formats)
    return _render_plane(group, attrs, loss, accuracy, done, label, out, formats)


def _render_line(group, attrs, loss, accuracy, done, label, out: Path, formats) -> list[Path]:
    x = np.asarray(group["x"])
    figure, loss_axis = plt.subplots(figsize=(5.5, 3.6), constrained_layout=True)
    loss_axis.plot(x, loss, color="#0072b2", marker="o", markersize=3, label=label)
    loss_axis.set_xlabel("alpha" if attrs.get("kind") == "target" else "direction 1")
    loss_axis.set_ylabel(label, color="#0072b2")
    accuracy_axis = loss_axis.twinx()
    accuracy_axis.plot(x, accuracy, color="#d55e00", marker="s", markersize=3, linestyle="--", label="accuracy")
    accuracy_axis.set_ylabel("accuracy", color="#d55e00")
    for position in ((0.0, 1.0) if attrs.get("kind") == "target" else (0.0,)):
        loss_axis.axvline(position, color="grey", linewidth=0.6, linestyle=":")
    loss_axis.set_title(f"Loss along a line ({_title_suffix(attrs, done)})")
    return save(figure, out, "landscape_line", formats)


def _render_plane(group, attrs, loss, accuracy, done, label, out: Path, formats) -> list[Path]:
    x, y = np.asarray(group["x"]), np.asarray(group["y"])
    trajectory = np.asarray(group["trajectory"]) if "trajectory" in group else None
    written: list[Path] = []
    if len(x) < 2 or len(y) < 2:
        log.warning("landscape has fewer than 2 points per axis; no contour or surface drawn")
        return written
    suffix = _title_suffix(attrs, done)
    labels = _axis_labels(group)

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.9), constrained_layout=True)
    for axis, values, name, cmap in ((axes[0], loss, label, "viridis"), (axes[1], accuracy, "accuracy", "cividis")):
        if values.count() == 0:
            axis.set_title(f"{name}: no finite values")
            continue
        levels = contour_levels(values)
        filled = axis.contourf(x, y, values, levels=levels, cmap=cmap)
        axis.contour(x, y, values, levels=levels[::3], colors="k", linewidths=0.4, alpha=0.6)
        figure.colorbar(filled, ax=axis, label=name)
        _decorate(axis, trajectory, name, labels)
    figure.suptitle(f"Loss landscape ({suffix})")
    written += save(figure, out, "landscape_contour", formats)

    figure, axis = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")  # diverged or not yet evaluated
    mesh = axis.pcolormesh(x, y, loss, cmap=cmap, shading="nearest")
    figure.colorbar(mesh, ax=axis, label=label)
    _decorate(axis, trajectory, label, labels)
    axis.set_title(f"Loss heatmap ({suffix})", fontsize=8)
    written += save(figure, out, "landscape_heatmap", formats)

    figure = plt.figure(figsize=(5.5, 4.5))
    axis = figure.add_subplot(projection="3d")
    grid_x, grid_y = np.meshgrid(x, y)
    axis.plot_surface(grid_x, grid_y, loss.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True)
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_zlabel(label)
    axis.set_title("Loss surface")
    written += save(figure, out, "landscape_surface", formats)
    written.append(_write_html_surface(x, y, loss, label, labels, out / "landscape_surface.html"))
    return written


def _axis_labels(group) -> tuple[str, str]:
    if "explained_variance_ratio" in group:
        ratios = np.asarray(group["explained_variance_ratio"]).tolist() + [float("nan")]
        return f"PC 1 ({100 * ratios[0]:.1f}% of variance)", f"PC 2 ({100 * ratios[1]:.1f}% of variance)"
    return "direction 1", "direction 2"


def _decorate(axis, trajectory, name: str, labels: tuple[str, str]) -> None:
    axis.plot(0, 0, marker="+", color="red", markersize=10)
    if trajectory is not None and trajectory.ndim == 2 and trajectory.shape[1] == 2:
        # The path of the training checkpoints; the orange dot is the first one.
        axis.plot(trajectory[:, 0], trajectory[:, 1], color="white", linewidth=1.2, marker="o", markersize=2.5)
        axis.plot(trajectory[0, 0], trajectory[0, 1], marker="o", color="orange", markersize=5)
    axis.set_xlabel(labels[0])
    axis.set_ylabel(labels[1])
    axis.set_aspect("equal", adjustable="box")
    axis.set_title(name)


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
