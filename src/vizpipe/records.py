"""How each analysis result becomes HDF5 datasets, attributes and MLflow metrics.

The names here are the file format: keep them in step with docs/hdf5-layout.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from vizpipe.analyses import (
    ActivationMaximizationResult,
    ConvKernelsResult,
    HessianResult,
    LandscapeResult,
)

Record = tuple[str, dict[str, Any], dict[str, Any]]  # group, datasets, attrs


def conv_kernels_records(result: ConvKernelsResult, normalize: str) -> list[Record]:
    return [
        (f"conv_kernels/{layer}", {"weight": weight}, {"layer": layer, "normalize": normalize})
        for layer, weight in result.weights.items()
    ]


def _cosine(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    a = torch.cat([d.flatten().double() for d in first])
    b = torch.cat([d.flatten().double() for d in second])
    denominator = float(a.norm() * b.norm())
    return float(torch.dot(a, b)) / denominator if denominator > 0 else float("nan")


def landscape_record(result: LandscapeResult, log_scale: bool, max_val: float | None) -> Record:
    directions = {
        f"direction_{index + 1}": dict(zip(result.parameter_names, direction))
        for index, direction in enumerate(result.directions)
    }
    datasets = {
        "x": result.x,
        "y": result.y,
        "loss": result.loss,
        "accuracy": result.accuracy,
        "parameter_names": result.parameter_names,
        **directions,
    }
    attrs = {
        "base_loss": result.base_loss,
        "base_accuracy": result.base_accuracy,
        "num_samples": result.num_samples,
        "normalization": result.normalization,
        "ignore": result.ignore,
        "seed": -1 if result.seed is None else result.seed,
        "direction_cosine": _cosine(*result.directions),
        "log_scale": log_scale,
        "max_val": max_val,
    }
    return "landscape", datasets, attrs


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


def landscape_metrics(result: LandscapeResult) -> dict[str, float]:
    finite = torch.isfinite(result.loss)
    metrics = {
        "landscape/center_loss": result.base_loss,
        "landscape/center_accuracy": result.base_accuracy,
        "landscape/diverged_points": float((~finite).sum()),
    }
    if finite.any():
        metrics["landscape/max_loss"] = float(result.loss[finite].max())
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def hessian_metrics(result: HessianResult) -> dict[str, float]:
    metrics = {f"hessian/eigenvalue/{name}": float(value) for name, value in zip(result.parameter_names, result.eigenvalues)}
    metrics["hessian/max_eigenvalue"] = float(result.eigenvalues.max())
    metrics["hessian/not_converged"] = float(len(result.not_converged))
    return metrics


def activation_maximization_metrics(result: ActivationMaximizationResult) -> dict[str, float]:
    """Per-layer means and each channel's final activation (the mean over its images)."""
    layer = result.layer
    metrics = {
        f"activation_maximization/{layer}/mean_final_activation": float(result.final_activations.mean()),
        f"activation_maximization/{layer}/mean_start_activation": float(result.start_activations.mean()),
    }
    channels = torch.tensor(result.channels)
    for channel in dict.fromkeys(result.channels):
        value = result.final_activations[channels == channel].mean()
        metrics[f"activation_maximization/{layer}/final_activation/{channel}"] = float(value)
    return metrics
