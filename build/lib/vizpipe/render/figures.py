"""Render every figure a results file supports."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from vizpipe.analyses.conv_kernels import kernel_grid
from vizpipe.errors import VizpipeError
from vizpipe.render.common import STYLE, safe_name, save
from vizpipe.store import Results, read_results

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("png", "pdf", "svg")


def resolve_results_path(source: str | Path) -> Path:
    """Accept a results.h5 path or a run folder that contains one."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "results.h5"
    if not path.is_file():
        raise VizpipeError(f"results file not found: {path}; pass a results.h5 or the run folder that holds it")
    return path


def render_results(
    source: str | Path,
    out_dir: str | Path | None = None,
    formats: list[str] | tuple[str, ...] = ("png", "pdf"),
    log_scale: bool | None = None,
    max_val: float | None = None,
    kernel_normalize: str | None = None,
) -> list[Path]:
    """Draw all figures for the analyses in a results file; return the written paths.

    ``out_dir`` defaults to ``figures/`` next to the results file. ``log_scale``,
    ``max_val`` and ``kernel_normalize`` override the rendering choices stored in
    the file. GIFs of activation-maximization frames are written besides the
    requested formats.
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
            written += _landscape(results, out, formats, log_scale, max_val)
        if "hessian" in results:
            written += _hessian(results, out, formats)
        if "conv_kernels" in results:
            written += _kernels(results, out, formats, kernel_normalize)
        if "activation_maximization" in results:
            written += _activation_maximization(results, out, formats)
        if "training" in results:
            written += _training(results, out, formats)
    if not written:
        log.warning("%s holds no analysis results; no figure was drawn", path)
    return written


def _landscape_values(results: Results, key: str, log_scale: bool, max_val: float | None) -> np.ndarray:
    values = np.ma.masked_invalid(np.asarray(results["landscape"][key], dtype=np.float64))
    if key == "loss":
        if max_val is not None:
            values = np.ma.minimum(values, max_val)
        if log_scale:
            values = np.ma.log10(np.ma.maximum(values, 1e-12))
    return values


def _landscape(results: Results, out: Path, formats, log_scale, max_val) -> list[Path]:
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


def _hessian(results: Results, out: Path, formats) -> list[Path]:
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


def _kernels(results: Results, out: Path, formats, normalize_override) -> list[Path]:
    written = []
    for layer, group in results["conv_kernels"].items():
        attrs = results.group_attrs[f"conv_kernels/{layer}"]
        normalize = normalize_override or attrs.get("normalize", "tile")
        weight = torch.from_numpy(np.asarray(group["weight"]))
        grid = kernel_grid(weight, normalize=normalize).numpy()
        rgb = grid.ndim == 3
        height, width = grid.shape[:2]
        scale = min(8.0 / max(width, 1), 8.0 / max(height, 1), 0.25)
        figure, axis = plt.subplots(figsize=(max(width * scale, 2.5), max(height * scale, 2.0)), constrained_layout=True)
        cmap = plt.get_cmap("gray" if normalize == "tile" else "RdBu_r").copy()
        cmap.set_bad("#cfe0f0")  # padding between tiles, distinct from any weight value
        shown = np.where(np.isnan(grid), 1.0, grid) if rgb else np.ma.masked_invalid(grid)
        axis.imshow(shown, cmap=None if rgb else cmap, vmin=0, vmax=1, interpolation="nearest")
        axis.set_axis_off()
        out_channels, in_channels = weight.shape[:2]
        if rgb or in_channels == 1:
            layout = "one tile per filter"
        else:
            layout = "rows: output channels, columns: input channels"
        axis.set_title(f"{layer} kernels [{out_channels}x{in_channels}x{weight.shape[2]}x{weight.shape[3]}], {layout}")
        written += save(figure, out, f"conv_kernels_{layer}", formats)
    return written


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


def _activation_maximization(results: Results, out: Path, formats) -> list[Path]:
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


def _training(results: Results, out: Path, formats) -> list[Path]:
    group = results["training"]
    epochs = np.arange(1, len(group["train_loss"]) + 1)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(8, 3), constrained_layout=True)
    loss_axis.plot(epochs, group["train_loss"], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss")
    accuracy_axis.plot(epochs, group["train_accuracy"], marker="o", label="train")
    accuracy_axis.plot(epochs, group["test_accuracy"], marker="o", label="test")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.legend()
    return save(figure, out, "training", formats)
