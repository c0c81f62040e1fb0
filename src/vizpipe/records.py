"""How each analysis result becomes HDF5 datasets, attributes and MLflow metrics.

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
from vizpipe.analyses.directions import Directions

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
    """The landscape group before any point is evaluated: NaN values, ``done`` all False."""
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
        key: torch.from_numpy(np.asarray(group[key])) for key in ("explained_variance_ratio", "trajectory") if key in group
    }
    return Directions(names, vectors, attrs.get("kind", "random"), extras)


def hessian_record(result: HessianResult) -> Record:
    datasets = {
        "parameter_names": result.parameter_names,
        "eigenvalues": result.eigenvalues,
        "iterations": result.iterations,
        "residuals": result.residuals,
        "converged": result.converged,
        "history": result.history,
    }
    attrs = {
        "method": result.method,
        "max_iterations": result.max_iterations,
        "tol": result.tol,
        "num_samples": result.num_samples,
        "skipped": result.skipped,
    }
    return "hessian", datasets, attrs


def activation_maximization_record(result: ActivationMaximizationResult) -> Record:
    datasets = {
        "channels": torch.tensor(result.channels, dtype=torch.int64),
        "images": result.images,
        "display_images": result.display_images,
        "activations": result.final_activations,
        "start_activations": result.start_activations,
        "history": result.history,
        "frames": result.frames,
        "frame_iterations": torch.tensor(result.frame_iterations, dtype=torch.int64),
    }
    attrs = {"layer": result.layer, **result.settings}
    return f"activation_maximization/{result.layer}", datasets, attrs


def landscape_metrics(result: LandscapeResult, radius: float | None = None) -> dict[str, float]:
    """Summary numbers of a landscape; NaN and inf points are left out and counted.

    ``min_loss`` comes with its coordinates; ``loss_increase_mean`` and
    ``loss_increase_max`` are over the points within ``radius`` of the center
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


def hessian_metrics(result: HessianResult) -> dict[str, float]:
    metrics = {f"hessian/eigenvalue/{name}": float(value) for name, value in zip(result.parameter_names, result.eigenvalues)}
    metrics["hessian/max_eigenvalue"] = float(result.eigenvalues.max())
    metrics["hessian/not_converged"] = float(len(result.not_converged))
    return metrics


def activation_maximization_metrics(result: ActivationMaximizationResult) -> dict[str, float]:
    layer = result.layer
    return {
        f"activation_maximization/{layer}/mean_final_activation": float(result.final_activations.mean()),
        f"activation_maximization/{layer}/mean_start_activation": float(result.start_activations.mean()),
    }
