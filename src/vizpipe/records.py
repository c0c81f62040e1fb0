"""Conversion of each analysis result into HDF5 datasets, attributes and MLflow metrics.

The names here are the file format: keep them in step with docs/hdf5-layout.md.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from vizpipe.analyses import (
    ActivationMaximizationResult,
    ConvKernelsResult,
    HessianResult,
    LandscapeResult,
)
from vizpipe.analyses.activation_maximization import dead_channels
from vizpipe.analyses.directions import Directions
from vizpipe.analyses.hessian_spectrum import SpectralDensity, TopEigenvalues, TraceEstimate

Record = tuple[str, dict[str, Any], dict[str, Any]]  # group, datasets, attrs


def conv_kernels_records(result: ConvKernelsResult, normalize: str) -> list[Record]:
    return [
        (f"conv_kernels/{layer}", {"weight": weight}, {"layer": layer, "normalize": normalize})
        for layer, weight in result.weights.items()
    ]


def landscape_datasets(x, y, loss, accuracy, done, directions: Directions) -> dict[str, Any]:
    datasets = {"x": x, "loss": loss, "accuracy": accuracy, "done": done, "parameter_names": directions.names}
    if y is not None:
        datasets["y"] = y
    for index, vector in enumerate(directions.vectors):
        datasets[f"direction_{index + 1}"] = dict(zip(directions.names, vector))
    datasets.update(directions.extras)
    return datasets


def landscape_skeleton(x, y, directions: Directions, attrs: dict[str, Any]) -> Record:
    """Build the landscape group before any point is evaluated: NaN values, ``done`` all False."""
    shape = (len(x),) if y is None else (len(y), len(x))
    loss = torch.full(shape, float("nan"), dtype=torch.float64)
    datasets = landscape_datasets(x, y, loss, loss.clone(), torch.zeros(shape, dtype=torch.bool), directions)
    return "landscape", datasets, {**attrs, "complete": False}


def landscape_record(result: LandscapeResult, attrs: dict[str, Any], metrics: dict[str, float]) -> Record:
    datasets = landscape_datasets(result.x, result.y, result.loss, result.accuracy, result.done, result.directions)
    attrs = {
        **attrs,
        **result.settings,
        "kind": result.directions.kind,
        "base_loss": result.base_loss,
        "base_accuracy": result.base_accuracy,
        "num_samples": result.num_samples,
        "direction_cosine": result.directions.cosine(),
        "complete": bool(result.done.all()),
        "metrics_json": json.dumps(metrics),
    }
    return "landscape", datasets, attrs


def directions_from_group(group: dict[str, Any], attrs: dict[str, Any]) -> Directions:
    """Rebuild the ``Directions`` stored in a landscape group read by ``store.read_results``."""
    names = list(group["parameter_names"])
    vectors = []
    for index in (1, 2):
        stored = group.get(f"direction_{index}")
        if stored is None:
            break
        vectors.append([torch.from_numpy(np.asarray(stored[name])) for name in names])
    extras = {
        key: torch.from_numpy(np.asarray(group[key])) for key in ("explained_variance_ratio", "trajectory", "hessian_eigenvalues") if key in group
    }
    return Directions(names, vectors, attrs.get("kind", "random"), extras)


def hessian_records(
    blocks: HessianResult | None,
    top: TopEigenvalues | None = None,
    trace: TraceEstimate | None = None,
    density: SpectralDensity | None = None,
) -> list[Record]:
    """Return the ``hessian`` group (per-block values) and its ``top_k``, ``trace`` and ``density`` subgroups.

    The ``hessian`` group comes first: writing it replaces any older subgroups.
    """
    datasets: dict[str, Any] = {}
    attrs: dict[str, Any] = {}
    if blocks is not None:
        datasets = {
            "block_names": blocks.block_names,
            "block_parameters": [",".join(names) for names in blocks.block_parameters],
            "block_sizes": torch.tensor(blocks.block_sizes, dtype=torch.int64),
            "parameter_names": [name for names in blocks.block_parameters for name in names],
            "eigenvalues": blocks.eigenvalues,
            "largest": blocks.largest,
            "smallest": blocks.smallest,
            "iterations": blocks.iterations,
            "residuals": blocks.residuals,
            "converged": blocks.converged,
            "history": blocks.history,
        }
        if blocks.verify:
            datasets["eigenvalues_by_start"] = blocks.eigenvalues_by_start
            datasets["disagree"] = torch.tensor([name in blocks.disagreeing for name in blocks.block_names])
        attrs = {
            "method": blocks.method,
            "group_by": blocks.group_by,
            "which": blocks.which,
            "curvature": blocks.curvature,
            "max_iterations": blocks.max_iterations,
            "tol": blocks.tol,
            "num_samples": blocks.num_samples,
            "seed": blocks.seed,
            "verify": blocks.verify,
            "products": blocks.products,
            "skipped": blocks.skipped,
        }
    result = [("hessian", datasets, attrs)]
    if top is not None:
        top_datasets = {"eigenvalues": top.eigenvalues, "residuals": top.residuals, "history": top.history,
                        "parameter_names": top.parameter_names}
        if top.eigenvectors is not None:
            top_datasets["eigenvectors"] = top.eigenvectors
        result.append(("hessian/top_k", top_datasets,
                       {"k": len(top.eigenvalues), "iterations": top.iterations, "converged": top.converged,
                        "method": top.method}))
    if trace is not None:
        result.append(("hessian/trace", {"samples": trace.samples},
                       {"trace": trace.trace, "standard_error": trace.standard_error, "converged": trace.converged}))
    if density is not None:
        result.append(("hessian/density",
                       {"nodes": density.nodes, "weights": density.weights, "grid": density.grid, "density": density.density},
                       {"sigma": density.sigma, "num_parameters": density.num_parameters}))
    return result


def activation_maximization_record(result: ActivationMaximizationResult) -> Record:
    """Build one layer's group without the ``complete`` attribute, which the caller sets once the group is written."""
    datasets = {
        "channels": torch.tensor(result.channels, dtype=torch.int64),
        "images": result.images,
        "display_images": result.display_images,
        "activations": result.final_activations,
        "start_activations": result.start_activations,
        "history": result.history,
        "frames": result.frames,
        "frame_iterations": torch.tensor(result.frame_iterations, dtype=torch.int64),
        "dead": result.dead.to(torch.bool),
    }
    attrs = {"layer": result.layer, **result.settings}
    return f"activation_maximization/{result.layer}", datasets, attrs


def landscape_metrics(result: LandscapeResult, radius: float | None = None) -> dict[str, float]:
    """Summary numbers of a landscape; NaN and inf points are left out and counted.

    ``min_loss`` comes with its coordinates. ``loss_increase_mean`` and
    ``loss_increase_max`` cover the points within ``radius`` of the center
    (default: a quarter of the largest ``|x|``), relative to the model's own loss.
    """
    finite = torch.isfinite(result.loss) & result.done
    metrics = {
        "landscape/center_loss": result.base_loss,
        "landscape/center_accuracy": result.base_accuracy,
        "landscape/diverged_points": float((result.done & ~torch.isfinite(result.loss)).sum()),
    }
    if not finite.any():
        return {key: value for key, value in metrics.items() if not math.isnan(value)}

    if result.y is None:
        grid_x, grid_y = result.x, torch.zeros_like(result.x)
    else:
        grid_y, grid_x = torch.meshgrid(result.y, result.x, indexing="ij")
    values = torch.where(finite, result.loss, torch.full_like(result.loss, float("inf")))
    best = int(values.argmin())
    metrics["landscape/min_loss"] = float(values.flatten()[best])
    metrics["landscape/min_loss_x"] = float(grid_x.flatten()[best])
    if result.y is not None:
        metrics["landscape/min_loss_y"] = float(grid_y.flatten()[best])
    metrics["landscape/max_loss"] = float(result.loss[finite].max())

    radius = radius if radius is not None else 0.25 * float(result.x.abs().max())
    inside = finite & ((grid_x**2 + grid_y**2).sqrt() <= radius + 1e-12)
    if inside.any():
        increase = result.loss[inside] - result.base_loss
        metrics["landscape/loss_increase_mean"] = float(increase.mean())
        metrics["landscape/loss_increase_max"] = float(increase.max())
        metrics["landscape/summary_radius"] = radius
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def hessian_metrics(
    blocks: HessianResult | None, top: TopEigenvalues | None = None, trace: TraceEstimate | None = None
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if blocks is not None:
        for index, name in enumerate(blocks.block_names):
            metrics[f"hessian/eigenvalue/{name}"] = float(blocks.eigenvalues[index])
            metrics[f"hessian/iterations/{name}"] = float(blocks.iterations[index])
            if blocks.which == "extremes":
                metrics[f"hessian/smallest_eigenvalue/{name}"] = float(blocks.smallest[index])
        metrics["hessian/max_eigenvalue"] = float(blocks.eigenvalues.max())
        metrics["hessian/not_converged"] = float(len(blocks.not_converged))
        if blocks.verify:
            metrics["hessian/disagreeing"] = float(len(blocks.disagreeing))
    if top is not None:
        for index, value in enumerate(top.eigenvalues.tolist()):
            metrics[f"hessian/top_k/{index + 1}"] = value
    if trace is not None:
        metrics["hessian/trace"] = trace.trace
        metrics["hessian/trace_standard_error"] = trace.standard_error
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def activation_maximization_metrics(result: ActivationMaximizationResult) -> dict[str, float]:
    """Per-layer means, the number of dead channels and each channel's final activation (the mean over its images)."""
    layer = result.layer
    metrics = {
        f"activation_maximization/{layer}/mean_final_activation": float(result.final_activations.mean()),
        f"activation_maximization/{layer}/mean_start_activation": float(result.start_activations.mean()),
        f"activation_maximization/{layer}/dead_channels": float(len(dead_channels(result.channels, result.dead))),
    }
    channels = torch.tensor(result.channels)
    for channel in dict.fromkeys(result.channels):
        value = result.final_activations[channels == channel].mean()
        metrics[f"activation_maximization/{layer}/final_activation/{channel}"] = float(value)
    return metrics
