"""Activation-maximization figures: a grid of final images and a GIF of all channels per
layer, one GIF and one final PNG per channel, and activation curves."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image

from vizpipe.render.common import frame_axes, safe_name, save
from vizpipe.store import Results

log = logging.getLogger(__name__)

_MIN_PIXELS = 128  # per-channel files are scaled up by whole factors to at least this size


_FRAME_GREY = 140  # uint8 grey of the lines around tiles in GIFs and PNGs, the same as FRAME_COLOR


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


def _framed_picture(images: np.ndarray, columns: int, zoom: int) -> np.ndarray:
    """Scale [N, C, H, W] uint8 images up by ``zoom`` and tile them as RGB, each inside a 1-pixel grey frame.

    Neighbouring tiles share a frame line; empty places in the last row stay white.
    """
    zoomed = images.repeat(zoom, axis=2).repeat(zoom, axis=3)
    count, channels, height, width = zoomed.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 255, np.uint8)
    for index in range(count):
        top = (index // columns) * (height + 1)
        left = (index % columns) * (width + 1)
        grid[top : top + height + 2, left : left + width + 2] = _FRAME_GREY
        grid[top + 1 : top + 1 + height, left + 1 : left + 1 + width] = zoomed[index].transpose(1, 2, 0)
    return _as_rgb(grid)


def _as_rgb(grid: np.ndarray) -> np.ndarray:
    if grid.shape[2] == 3:
        return grid
    if grid.shape[2] == 1:
        return np.repeat(grid, 3, axis=2)
    # NOTE: images with 2 or 4+ channels are shown by their first 3 channels (2 channels: the first, as gray).
    return grid[:, :, :3] if grid.shape[2] > 3 else np.repeat(grid[:, :, :1], 3, axis=2)


def _zoom(height: int, target: int) -> int:
    return max(1, -(-target // max(height, 1)))


def render_activation_maximization(results: Results, out: Path, formats) -> list[Path]:
    written = []
    for layer, group in results["activation_maximization"].items():
        written += _final_grid(group, layer, out, formats)
        frames = np.asarray(group["frames"])  # [frames, images, C, H, W] uint8
        columns = int(np.ceil(np.sqrt(frames.shape[1])))
        written.append(_write_gif(frames, columns, out / f"{safe_name('activation_maximization_' + layer)}.gif", 64))
        written += _per_channel_files(group, layer, out)
        written += _activation_curves(group, layer, out, formats)
    return written


def grid_figure_stem(layer: str) -> str:
    """File name, without extension, of the figure of ``layer``'s final images."""
    return safe_name(f"activation_maximization_{layer}")


def _final_grid(group: dict, layer: str, out: Path, formats) -> list[Path]:
    """Draw the final images in a grid, with a grey tile labelled "dead" in place of each dead image."""
    images = np.asarray(group["display_images"], dtype=np.float32)
    channels = np.asarray(group["channels"])
    activations = np.asarray(group["activations"])
    # Files written before dead images were detected have no ``dead`` dataset.
    dead = np.asarray(group.get("dead", np.zeros(len(images), dtype=bool)), dtype=bool)
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.35 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(images):
            axis.set_axis_off()
            continue
        frame_axes(axis)  # a white image would otherwise vanish into the page
        if dead[index]:
            axis.imshow(np.full(images.shape[2:], 0.5), cmap="gray", vmin=0, vmax=1)
            axis.text(0.5, 0.5, "dead", transform=axis.transAxes, ha="center", va="center", color="white", fontsize=8)
            axis.set_title(f"ch {channels[index]}\ndead", fontsize=6)
            continue
        image = images[index].transpose(1, 2, 0)
        if image.shape[2] == 1:
            axis.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            axis.imshow(_as_rgb(image).clip(0, 1), interpolation="nearest")
        axis.set_title(f"ch {channels[index]}\n{activations[index]:.3g}", fontsize=6)
    figure.suptitle(f"Activation maximization: {layer} (title: channel, final activation)", fontsize=9)
    figure.tight_layout()
    return save(figure, out, grid_figure_stem(layer), formats)


def _write_gif(frames: np.ndarray, columns: int, path: Path, target_pixels: int) -> Path:
    """Write [F, N, C, H, W] uint8 frames as a looping GIF, the N images tiled in ``columns``."""
    zoom = _zoom(frames.shape[3], target_pixels)
    pictures = []
    for frame in frames:
        pictures.append(Image.fromarray(_framed_picture(frame, columns, zoom).astype(np.uint8), mode="RGB"))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=80, loop=0)
    return path


def _per_channel_files(group: dict, layer: str, folder: Path) -> list[Path]:
    """Write ``<layer>_<channel>.gif`` and ``<layer>_<channel>_final.png``; a channel's images sit side by side."""
    frames = np.asarray(group["frames"])
    display = np.asarray(group["display_images"], dtype=np.float32)
    channels = np.asarray(group["channels"])
    written = []
    for channel in dict.fromkeys(channels.tolist()):
        members = np.flatnonzero(channels == channel)
        stem = safe_name(f"{layer}_{channel}")
        written.append(_write_gif(frames[:, members], len(members), folder / f"{stem}.gif", _MIN_PIXELS))
        final = (display[members] * 255.0).round().clip(0, 255).astype(np.uint8)
        zoom = _zoom(final.shape[2], _MIN_PIXELS)
        path = folder / f"{stem}_final.png"
        Image.fromarray(_framed_picture(final, len(members), zoom), mode="RGB").save(path)
        written.append(path)
    return written


def _activation_curves(group: dict, layer: str, out: Path, formats) -> list[Path]:
    history = np.asarray(group["history"])  # [iterations + 1, images]
    figure, axis = plt.subplots(figsize=(5, 3.2), constrained_layout=True)
    axis.plot(history, linewidth=0.6, alpha=0.5)
    axis.plot(history.mean(axis=1), color="k", linewidth=1.5, label="mean over images")
    axis.set_xlabel("step")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel("activation (objective)")
    axis.set_title(f"Activation maximization: {layer}")
    axis.legend()
    return save(figure, out, f"activation_curves_{layer}", formats)
