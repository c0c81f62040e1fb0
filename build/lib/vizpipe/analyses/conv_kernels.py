"""Convolution kernels as raw weights and as a tile grid."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vizpipe.analyses.modules import conv_layer_names, find_layer
from vizpipe.errors import VizpipeError


@dataclass
class ConvKernelsResult:
    """Weights of each selected convolution layer, ``{layer: [out, in, kH, kW]}``, on the CPU."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)


def conv_kernels(model: nn.Module, layers: list[str] | None = None) -> ConvKernelsResult:
    """Copy the weights of ``layers`` (default: every 2D convolution) to the CPU.

    Example::

        result = conv_kernels(model, ["pre_conv"])
        grid = kernel_grid(result.weights["pre_conv"])  # [rows, cols, 3] or [rows, cols]
    """
    if layers is None:
        layers = [name for name in conv_layer_names(model) if isinstance(find_layer(model, name), nn.Conv2d)]
        if not layers:
            raise VizpipeError(f"{type(model).__name__} has no Conv2d layer to draw kernels of")
    weights = {}
    for name in layers:
        module = find_layer(model, name, (nn.Conv2d,), "conv kernels")
        weights[name] = module.weight.detach().to("cpu", torch.float32).clone()
    return ConvKernelsResult(weights)


def kernel_grid(weight: torch.Tensor, normalize: str = "tile", rgb: bool | None = None, padding: int = 1) -> torch.Tensor:
    """Lay out a conv weight [out, in, kH, kW] as an image grid with values in [0, 1].

    With ``rgb`` (default: when ``in == 3``) each output channel is one colour
    tile, in a near-square grid, and so is each grayscale kernel when ``in == 1``;
    otherwise row ``i`` shows output channel ``i`` and column ``j`` its input
    channel ``j``. ``normalize="tile"`` maps each tile's
    own min..max to 0..1 (shape, not scale); ``"grid"`` uses one symmetric range for
    the whole grid, so magnitudes compare across tiles and 0.5 is a zero weight.
    Padding between tiles is NaN so a renderer can draw it as background.
    """
    if weight.dim() != 4:
        raise VizpipeError(f"kernel_grid needs a [out, in, kH, kW] weight, got shape {list(weight.shape)}")
    if normalize not in ("tile", "grid"):
        raise VizpipeError(f"invalid kernel normalization {normalize!r}; use 'tile' or 'grid'")
    weight = weight.detach().float().cpu()
    out_channels, in_channels, kh, kw = weight.shape
    rgb = in_channels == 3 if rgb is None else rgb

    if rgb or in_channels == 1:
        # One tile per filter in a near-square grid (colour tiles for RGB inputs).
        tiles = weight.permute(0, 2, 3, 1) if rgb else weight[:, 0]
        cols = math.ceil(math.sqrt(out_channels))
        rows = -(-out_channels // cols)
        positions = [(i // cols, i % cols) for i in range(out_channels)]
    else:
        tiles = weight.reshape(out_channels * in_channels, kh, kw)
        rows, cols = out_channels, in_channels
        positions = [(i, j) for i in range(out_channels) for j in range(in_channels)]

    if normalize == "tile":
        flat = tiles.reshape(len(tiles), -1)
        low = flat.min(dim=1).values.view(-1, *[1] * (tiles.dim() - 1))
        high = flat.max(dim=1).values.view(-1, *[1] * (tiles.dim() - 1))
        tiles = (tiles - low) / (high - low).clamp_min(1e-12)
    else:
        scale = tiles.abs().max().clamp_min(1e-12)
        tiles = 0.5 + 0.5 * tiles / scale

    channel_shape = (3,) if rgb else ()
    grid = torch.full(
        (rows * (kh + padding) - padding, cols * (kw + padding) - padding, *channel_shape), float("nan")
    )
    for tile, (row, col) in zip(tiles, positions):
        top, left = row * (kh + padding), col * (kw + padding)
        grid[top : top + kh, left : left + kw] = tile
    return grid

