"""Convolution kernel grids."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from vizpipe.analyses.conv_kernels import kernel_grid
from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)


def render_kernels(results: Results, out: Path, formats, normalize_override) -> list[Path]:
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
        # Padding between tiles gets a colour distinct from any weight value.
        cmap = plt.get_cmap("gray" if normalize == "tile" else "RdBu_r").with_extremes(bad="#cfe0f0")
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


