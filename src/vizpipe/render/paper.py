"""Paper figures that compare jobs: landscapes side by side, eigenvalues across
checkpoints or models, activation-maximization and kernel grids across jobs and
layers. Each figure is drawn from results files alone, with print style settings
and byte-identical output for identical inputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import BoundaryNorm
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from vizpipe.analyses.conv_kernels import kernel_grid
from vizpipe.errors import VizpipeError
from vizpipe.render.activation_maximization import _as_rgb, _tile
from vizpipe.render.common import FRAME_COLOR, ROUND_STEPS, STYLE, add_colorbar, save
from vizpipe.render.selection import KIND_ANALYSIS
from vizpipe.store import Results, read_results

log = logging.getLogger(__name__)
# Embedding TrueType fonts in PDF logs every subsetting step at INFO.
logging.getLogger("fontTools").setLevel(logging.WARNING)

FIGURE_KINDS = ("landscapes", "eigenvalues", "activation_maximization", "kernels")
# Okabe-Ito colours, distinguishable with the common forms of colour blindness.
OKABE_ITO = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"]
LANDSCAPE_LEVELS = 20


@dataclass
class Panel:
    """One job's results and the label it gets in a figure."""

    label: str
    results: Results
    source: str  # MLflow run id or results file path


@dataclass
class PaperFigure:
    paths: list[Path]
    labels: list[str]
    sources: list[str]
    color_limits: tuple[float, float] | None = None  # landscapes: the shared colour scale
    details: dict[str, Any] = field(default_factory=dict)


def print_style(style: Any) -> dict[str, Any]:
    """Turn the figure config's ``style`` into matplotlib rc settings for print."""
    return {
        **STYLE,
        "font.size": style.font_size,
        "font.family": style.font_family,
        "axes.titlesize": style.title_size,
        "axes.labelsize": style.font_size,
        "xtick.labelsize": style.font_size - 1,
        "ytick.labelsize": style.font_size - 1,
        "legend.fontsize": style.font_size - 1,
        "savefig.dpi": style.dpi,
        "pdf.fonttype": 42,  # TrueType fonts stay editable text in PDF
        "axes.prop_cycle": plt.cycler(color=OKABE_ITO),
        "image.cmap": style.cmap,
    }


def label_of(results: Results, key: str | None, fallback: str) -> str:
    """Label a job by the value of config ``key`` in its stored config, e.g. ``noise_range=0.1``."""
    if key is None:
        return fallback
    config = OmegaConf.create(results.attrs.get("config_yaml", "{}"))
    value = OmegaConf.select(config, key, default="?")
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    if isinstance(value, str) and "/" in value:
        value = Path(value).name  # checkpoint paths: the file name
    return f"{key.rsplit('.', 1)[-1]}={value}"


def load_panels(sources: list[tuple[str, Path, str]], label_key: str | None) -> list[Panel]:
    """Read each (source id, results path, fallback label) into a labelled panel."""
    panels = []
    for source, path, fallback in sources:
        results = read_results(path)
        panels.append(Panel(label_of(results, label_key, fallback), results, source))
    return panels


def render_paper_figure(panels: list[Panel], spec: Any, style: Any, out_dir: Path, formats: list[str]) -> PaperFigure:
    """Draw the figure that ``spec.kind`` names from ``panels`` into ``out_dir``."""
    if spec.kind not in FIGURE_KINDS:
        raise VizpipeError(f"invalid figure.kind {spec.kind!r}; use one of {', '.join(FIGURE_KINDS)}")
    if not panels:
        raise VizpipeError(f"figure {spec.name!r} selected no job with a results.h5; check figure.select")
    group = KIND_ANALYSIS[spec.kind]
    missing = [panel.source for panel in panels if group not in panel.results]
    if missing:
        raise VizpipeError(
            f"figure {spec.name!r} needs the {group} analysis, but these jobs have none: {', '.join(missing)}; "
            "narrow figure.select to jobs that ran it (figure.select.jobs or figure.select.where "
            "for a runs_folder, figure.select.filter_string for an MLflow experiment)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(print_style(style)):
        draw = {"landscapes": _landscapes, "eigenvalues": _eigenvalues,
                "activation_maximization": _activation_maximization, "kernels": _kernels}[spec.kind]
        figure, color_limits, details = draw(panels, spec, style)
        if spec.title:
            figure.suptitle(spec.title)
        paths = save(figure, out_dir, spec.name, formats)
    return PaperFigure(paths, [p.label for p in panels], [p.source for p in panels], color_limits, details)


def _landscape_loss(results: Results, spec: Any) -> np.ma.MaskedArray:
    values = np.ma.masked_invalid(np.asarray(results["landscape"]["loss"], dtype=np.float64))
    if spec.max_val is not None:
        values = np.ma.minimum(values, spec.max_val)
    if spec.log_scale:
        values = np.ma.log10(np.ma.maximum(values, 1e-12))
    return values


def _landscapes(panels, spec, style):
    losses = [_landscape_loss(panel.results, spec) for panel in panels]
    finite = [loss.compressed() for loss in losses if loss.count()]
    if not finite:
        raise VizpipeError(f"figure {spec.name!r}: no landscape has a finite loss value")
    low, high = float(min(v.min() for v in finite)), float(max(v.max() for v in finite))
    if high <= low:
        high = low + 1e-12
    levels = np.linspace(low, high, LANDSCAPE_LEVELS + 1)
    norm = BoundaryNorm(levels, plt.get_cmap(style.cmap).N)
    capped = spec.max_val is not None and any(_is_capped(panel.results, spec.max_val) for panel in panels)

    # The compressed layout packs the fixed-aspect panels without the gaps plain constrained layout leaves.
    figure, axes = plt.subplots(1, len(panels), figsize=(style.width, style.panel_height), squeeze=False,
                                layout="compressed")
    filled = None
    for axis, panel, loss in zip(axes[0], panels, losses):
        x = np.asarray(panel.results["landscape"]["x"])
        y = np.asarray(panel.results["landscape"]["y"])
        filled = axis.contourf(x, y, loss, levels=levels, cmap=style.cmap, norm=norm,
                               extend="max" if capped else "neither")
        axis.contour(x, y, loss, levels=levels[::2], colors="k", linewidths=0.3, alpha=0.6)
        axis.plot(0, 0, marker="+", color="#d55e00", markersize=6)
        axis.set_aspect("equal")
        for axis_ in (axis.xaxis, axis.yaxis):
            axis_.set_major_locator(MaxNLocator(nbins="auto", steps=ROUND_STEPS))
        axis.set_title(panel.label)
        axis.set_xlabel("direction 1")
    axes[0][0].set_ylabel("direction 2")
    label = "log10 loss" if spec.log_scale else "loss"
    if capped:
        label += f" (capped at {spec.max_val:g})"
    # One bar for the shared scale, beside the last panel and as tall as it.
    add_colorbar(axes[0][-1], filled, label)
    return figure, (low, high), {}


def _is_capped(results: Results, max_val: float) -> bool:
    loss = np.asarray(results["landscape"]["loss"], dtype=np.float64)
    return bool(np.any(loss[np.isfinite(loss)] > max_val))


def _eigenvalues(panels, spec, style):
    names: list[str] = []
    for panel in panels:
        names += [n for n in panel.results["hessian"]["parameter_names"] if n not in names]
    values = np.full((len(panels), len(names)), np.nan)
    for row, panel in enumerate(panels):
        group = panel.results["hessian"]
        for name, value in zip(group["parameter_names"], np.asarray(group["eigenvalues"], dtype=np.float64)):
            values[row, names.index(name)] = value

    height = max(style.panel_height, 0.5 + 0.16 * len(names) * max(1, len(panels) / 2))
    figure, axis = plt.subplots(figsize=(style.width, height), constrained_layout=True)
    bar = 0.8 / len(panels)
    positions = np.arange(len(names))
    for row, panel in enumerate(panels):
        axis.barh(positions - 0.4 + bar * (row + 0.5), values[row], height=bar, label=panel.label)
    axis.set_yticks(positions, names)
    axis.invert_yaxis()
    finite = values[np.isfinite(values)]
    if finite.size and np.abs(finite).max() > 0:
        axis.set_xscale("symlog", linthresh=max(np.abs(finite).max() * 1e-3, 1e-12))
    axis.axvline(0, color="k", linewidth=0.5)
    axis.set_xlabel("dominant eigenvalue of the parameter's Hessian block")
    axis.legend(loc="lower right")
    return figure, None, {"parameter_names": names, "eigenvalues": values}


def _layers_of(panels, spec, group: str) -> list[str]:
    layers = list(spec.layers) if spec.layers is not None else list(panels[0].results[group])
    for panel in panels:
        unknown = [layer for layer in layers if layer not in panel.results[group]]
        if unknown:
            raise VizpipeError(
                f"figure {spec.name!r}: job {panel.source} has no {group} result for layer(s) {unknown}; "
                f"it has {sorted(panel.results[group])}; fix figure.layers"
            )
    return layers


def _image_grid(panels, spec, style, group: str, image_of):
    layers = _layers_of(panels, spec, group)
    figure, axes = plt.subplots(
        len(panels), len(layers), figsize=(style.width, style.panel_height * len(panels)),
        squeeze=False, layout="compressed",
    )
    for row, panel in enumerate(panels):
        for column, layer in enumerate(layers):
            axis = axes[row][column]
            image, cmap, tiles = image_of(panel.results[group][layer], panel, layer)
            axis.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            for left, top, width, height in tiles:
                # pixel centres sit on integers, so a tile's edges are half a pixel outside them
                axis.add_patch(Rectangle((left - 0.5, top - 0.5), width, height, fill=False, edgecolor=FRAME_COLOR,
                                         linewidth=0.4))
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(layer)
            if column == 0:
                axis.set_ylabel(panel.label)
    return figure, None, {"layers": layers}


def _activation_maximization(panels, spec, style):
    def image_of(group, panel, layer):
        images = np.array(group["display_images"], dtype=np.float32)[: spec.max_channels]
        if "dead" in group:  # a dead channel's image shows no feature, so its tile is plain grey
            images[np.asarray(group["dead"], dtype=bool)[: spec.max_channels]] = 0.5
        columns = int(np.ceil(np.sqrt(len(images))))
        grid = _tile(images, columns, padding=1, fill=1.0)
        # A frame around every tile keeps white images visible on the white page.
        height, width = images.shape[2:]
        tiles = [((index % columns) * (width + 1), (index // columns) * (height + 1), width, height)
                 for index in range(len(images))]
        if grid.shape[2] == 1:
            return grid[:, :, 0], "gray", tiles
        return _as_rgb(grid).clip(0, 1), None, tiles

    return _image_grid(panels, spec, style, "activation_maximization", image_of)


def _kernels(panels, spec, style):
    def image_of(group, panel, layer):
        normalize = panel.results.group_attrs[f"conv_kernels/{layer}"].get("normalize", "tile")
        grid = kernel_grid(torch.from_numpy(np.asarray(group["weight"])), normalize=normalize).numpy()
        if grid.ndim == 3:
            return np.where(np.isnan(grid), 1.0, grid), None, []
        cmap = plt.get_cmap("gray" if normalize == "tile" else "RdBu_r").copy()
        cmap.set_bad("#cfe0f0")  # padding between tiles
        return np.ma.masked_invalid(grid), cmap, []

    return _image_grid(panels, spec, style, "conv_kernels", image_of)
