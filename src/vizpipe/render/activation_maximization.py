"""Activation-maximization image grids, frame GIFs and activation curves."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from vizpipe.render.common import safe_name, save
from vizpipe.store import Results

log = logging.getLogger(__name__)


def _tile(images: np.ndarray, columns: int, padding: int = 1, fill: float = 1.0) -> np.ndarray:
    """Tile [N, C, H, W] images into one [rows*(H+p), cols*(W+p), C] array."""
    count, channels, height, width = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + padding) - padding, columns * (width + padding) - padding, channels), fill, images.dtype)
    for index in range(count):
        top = (index // columns) * (height + padding)
        left = (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = images[index].transpose(1, 2, 0)
    return grid


def _as_rgb(grid: np.ndarray) -> np.ndarray:
    if grid.shape[2] == 3:
        return grid
    if grid.shape[2] == 1:
        return np.repeat(grid, 3, axis=2)
    return grid[:, :, :3]  # NOTE: images with 2 or 4+ channels are shown by their first 3 channels


def render_activation_maximization(results: Results, out: Path, formats) -> list[Path]:
    written = []
    for layer, group in results["activation_maximization"].items():
        images = np.asarray(group["display_images"], dtype=np.float32)
        channels = np.asarray(group["channels"])
        activations = np.asarray(group["activations"])
        columns = int(np.ceil(np.sqrt(len(images))))
        rows = -(-len(images) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows), squeeze=False)
        for index, axis in enumerate(axes.flat):
            axis.set_axis_off()
            if index >= len(images):
                continue
            image = images[index].transpose(1, 2, 0)
            if image.shape[2] == 1:
                axis.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                axis.imshow(_as_rgb(image).clip(0, 1), interpolation="nearest")
            axis.set_title(f"ch {channels[index]}\n{activations[index]:.3g}", fontsize=6)
        figure.suptitle(f"Activation maximization: {layer} (title: channel, final mean activation)", fontsize=9)
        figure.tight_layout()
        written += save(figure, out, f"activation_maximization_{layer}", formats)

        frames = np.asarray(group["frames"])  # [frames, channels, C, H, W] uint8
        written.append(_write_gif(frames, columns, out / f"{safe_name('activation_maximization_' + layer)}.gif"))
        written += _activation_curves(group, layer, out, formats)
    return written


def _write_gif(frames: np.ndarray, columns: int, path: Path) -> Path:
    height = frames.shape[3]
    zoom = max(1, 64 // max(height, 1))
    pictures = []
    for frame in frames:
        grid = _as_rgb(_tile(frame, columns, padding=1, fill=255))
        grid = grid.repeat(zoom, axis=0).repeat(zoom, axis=1)
        pictures.append(Image.fromarray(grid.astype(np.uint8), mode="RGB"))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=80, loop=0)
    return path


def _activation_curves(group: dict, layer: str, out: Path, formats) -> list[Path]:
    history = np.asarray(group["history"])  # [iterations + 1, channels]
    figure, axis = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    axis.plot(history, linewidth=0.6, alpha=0.5)
    axis.plot(history.mean(axis=1), color="k", linewidth=1.5, label="mean over channels")
    axis.set_xlabel("step")
    axis.set_ylabel("mean channel activation")
    axis.set_title(f"Activation maximization: {layer}")
    axis.legend()
    return save(figure, out, f"activation_curves_{layer}", formats)


