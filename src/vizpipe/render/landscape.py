"""Landscape figures: contour of loss and accuracy, 3D loss surface."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)


def _landscape_values(results: Results, key: str, log_scale: bool, max_val: float | None) -> np.ndarray:
    values = np.ma.masked_invalid(np.asarray(results["landscape"][key], dtype=np.float64))
    if key == "loss":
        if max_val is not None:
            values = np.ma.minimum(values, max_val)
        if log_scale:
            values = np.ma.log10(np.ma.maximum(values, 1e-12))
    return values


def render_landscape(results: Results, out: Path, formats, log_scale, max_val) -> list[Path]:
    group = results["landscape"]
    attrs = results.group_attrs["landscape"]
    log_scale = bool(attrs.get("log_scale", False)) if log_scale is None else log_scale
    max_val = attrs.get("max_val") if max_val is None else max_val
    x, y = np.asarray(group["x"]), np.asarray(group["y"])
    loss = _landscape_values(results, "loss", log_scale, max_val)
    accuracy = _landscape_values(results, "accuracy", False, None)
    loss_label = "log10 loss" if log_scale else "loss"
    written = []
    if len(x) < 2 or len(y) < 2:
        log.warning("landscape has fewer than 2 points per axis; no contour or surface drawn")
        return written

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.8), constrained_layout=True)
    for axis, values, label, cmap in ((axes[0], loss, loss_label, "viridis"), (axes[1], accuracy, "accuracy", "cividis")):
        if values.count() == 0:
            axis.set_title(f"{label}: no finite values")
            continue
        filled = axis.contourf(x, y, values, levels=20, cmap=cmap)
        axis.contour(x, y, values, levels=10, colors="k", linewidths=0.4, alpha=0.6)
        figure.colorbar(filled, ax=axis, label=label)
        axis.plot(0, 0, marker="+", color="red", markersize=10)
        axis.set_xlabel("direction 1")
        axis.set_ylabel("direction 2")
        axis.set_aspect("equal")
        axis.set_title(label)
    diverged = int(np.ma.count_masked(loss))
    figure.suptitle(
        f"Loss landscape ({attrs.get('normalization')}-normalized directions, "
        f"{attrs.get('num_samples')} samples{f', {diverged} diverged points masked' if diverged else ''})"
    )
    written += save(figure, out, "landscape_contour", formats)

    figure = plt.figure(figsize=(5.5, 4.5))
    axis = figure.add_subplot(projection="3d")
    grid_x, grid_y = np.meshgrid(x, y)
    axis.plot_surface(grid_x, grid_y, loss.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True)
    axis.set_xlabel("direction 1")
    axis.set_ylabel("direction 2")
    axis.set_zlabel(loss_label)
    axis.set_title("Loss surface")
    written += save(figure, out, "landscape_surface", formats)
    return written


