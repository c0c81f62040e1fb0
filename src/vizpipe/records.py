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
from vizpipe.analyses.hessian_spectrum import SpectralDensity, TopEigenvalues, TraceEstimate

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
        attrs = {
            "method": blocks.method,
            "group_by": blocks.group_by,
            "which": blocks.which,
            "curvature": blocks.curvature,
            "max_iterations": blocks.max_iterations,
            "tol": blocks.tol,
            "num_samples": blocks.num_samples,
            "seed": blocks.seed,
            "skipped": blocks.skipped,
        }
    result = [("hessian", datasets, attrs)]
    if top is not None:
        top_datasets = {"eigenvalues": top.eigenvalues, "residuals": top.residuals, "history": top.history,
                        "parameter_names": top.parameter_names}
        if top.eigenvectors is not None:
            top_datasets["eigenvectors"] = top.eigenvectors
        result.append(("hessian/top_k", top_datasets,
                       {"k": len(top.eigenvalues), "iterations": top.iterations, "converged": top.converged}))
    if trace is not None:
        result.append(("hessian/trace", {"samples": trace.samples},
                       {"trace": trace.trace, "standard_error": trace.standard_error, "converged": trace.converged}))
    if density is not None:
        result.append(("hessian/density",
                       {"nodes": density.nodes, "weights": density.weights, "grid": density.grid, "density": density.density},
                       {"sigma": density.sigma, "num_parameters": density.num_parameters}))
    return result


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
    if top is not None:
        for index, value in enumerate(top.eigenvalues.tolist()):
            metrics[f"hessian/top_k/{index + 1}"] = value
    if trace is not None:
        metrics["hessian/trace"] = trace.trace
        metrics["hessian/trace_standard_error"] = trace.standard_error
    return {key: value for key, value in metrics.items() if not math.isnan(value)}


def activation_maximization_metrics(result: ActivationMaximizationResult) -> dict[str, float]:
    layer = result.layer
    return {
        f"activation_maximization/{layer}/mean_final_activation": float(result.final_activations.mean()),
        f"activation_maximization/{layer}/mean_start_activation": float(result.start_activations.mean()),
    }
