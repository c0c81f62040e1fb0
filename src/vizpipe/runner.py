"""One vizpipe job: build the model and data, run the selected analyses, then
write results.h5, log to MLflow and render the figures."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vizpipe import distributed, interrupts, records, store
from vizpipe.analyses import (
    activation_maximization,
    conv_kernels,
    hessian_block_eigenvalues,
    loss_landscape,
)
from vizpipe.analyses.activation_maximization import count_channels
from vizpipe.analyses.directions import (
    Directions,
    check_fits,
    pca_directions,
    random_directions,
    state_entries,
    target_directions,
)
from vizpipe.analyses.hessian import select_parameters
from vizpipe.analyses.hessian_spectrum import (
    TOP_K_METHODS,
    eigenvector_directions,
    hessian_density,
    hessian_top_eigenvalues,
    hessian_trace,
)
from vizpipe.analyses.am.parameterizations import color_correlation_sqrt
from vizpipe.analyses.landscape import coordinates
from vizpipe.analyses.modules import find_layer
from vizpipe.data.base import ImageDataset, batches
from vizpipe.config import (
    ANALYSIS_ORDER,
    ActivationMaximizationConfig,
    AnalysesConfig,
    ConvKernelsConfig,
    EvaluationConfig,
    FiguresConfig,
    HessianConfig,
    LandscapeConfig,
    TrackingConfig,
    VizpipeConfig,
    WeightsConfig,
)
from vizpipe.errors import VizpipeError, suggest
from vizpipe.render import render_results, resolve_results_path
from vizpipe.render.activation_maximization import grid_figure_stem
from vizpipe.tracking import SweepInfo, Tracker, job_run_name
from vizpipe.training import load_checkpoint, read_state_dict, save_state_dict, train, weight_fingerprint

log = logging.getLogger("vizpipe")

# Schema dataclasses by the name their fields are annotated with (the
# annotations are strings under ``from __future__ import annotations``).
_SCHEMA_TYPES = {
    cls.__name__: cls
    for cls in (
        AnalysesConfig, ConvKernelsConfig, LandscapeConfig, HessianConfig, ActivationMaximizationConfig,
        WeightsConfig, EvaluationConfig, TrackingConfig, FiguresConfig,
    )
}
_SCHEMA_TYPES.update({f"Optional[{name}]": cls for name, cls in list(_SCHEMA_TYPES.items())})

WEIGHT_SOURCES = ("random", "checkpoint", "train")
# Analyses that split their work over torchrun ranks; the others run on rank 0 only.
SHARDED_ANALYSES = ("landscape", "hessian")
# Keys that change neither the computation nor the stored values: a run folder
# written with other values of these is still resumed.
CONFIG_HASH_EXCLUDED = ("progress", "tracking", "figures", "overwrite")
JOB_RECORD = "job.json"  # status, metrics and outputs of a job, in its run folder


@dataclass
class JobSummary:
    run_dir: Path
    results_path: Path
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str | None = None
    run_id: str | None = None
    status: str = "RUNNING"
    seconds: float = 0.0


def _check_known_keys(node: Any, schema: type, where: str) -> None:
    """Reject keys that the schema lacks: Hydra lets a ``+key=value`` override add any key."""
    if not OmegaConf.is_dict(node):
        return
    field_types = {item.name: item.type for item in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in field_types:
            name = f"{where}.{key}" if where else key
            raise VizpipeError(f"unknown config key {name!r}. {suggest(str(key), sorted(field_types))} Check the spelling")
        field_type = field_types[key]
        nested = _SCHEMA_TYPES.get(field_type if isinstance(field_type, str) else getattr(field_type, "__name__", ""))
        if nested is not None:
            _check_known_keys(node[key], nested, f"{where}.{key}" if where else key)


def validate(cfg: DictConfig) -> None:
    """Check value ranges the schema's types cannot express; raise ``VizpipeError`` on the first bad one."""
    _check_known_keys(cfg, VizpipeConfig, "")
    for section in ("analysis", "weights", "evaluation"):
        _check_finite(cfg[section], section)

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise VizpipeError(message)

    weights = cfg.weights
    require(weights.source in WEIGHT_SOURCES, f"invalid weights.source {weights.source!r}; use one of {', '.join(WEIGHT_SOURCES)}")
    if weights.source == "checkpoint":
        require(bool(weights.checkpoint), "weights.source=checkpoint needs weights.checkpoint=<path to a state_dict file>")
    if weights.source == "train":
        require(weights.epochs >= 1, f"invalid weights.epochs {weights.epochs}: it must be at least 1")
        require(weights.batch_size >= 1, f"invalid weights.batch_size {weights.batch_size}: it must be at least 1")
        require(weights.lr > 0, f"invalid weights.lr {weights.lr}: it must be positive")
    require(cfg.evaluation.split in ("train", "test"), f"invalid evaluation.split {cfg.evaluation.split!r}; use train or test")
    require(cfg.evaluation.batch_size >= 1, f"invalid evaluation.batch_size {cfg.evaluation.batch_size}: it must be at least 1")
    for owner in ("evaluation", "analysis.landscape", "analysis.hessian"):
        node = OmegaConf.select(cfg, owner)
        if node is not None and node.max_samples is not None:
            require(node.max_samples >= 1, f"invalid {owner}.max_samples {node.max_samples}: it must be at least 1 or null")

    analyses = cfg.analysis
    require(any(analyses[name] is not None for name in ANALYSIS_ORDER),
            "no analysis selected; choose some with analysis=[conv_kernels,landscape,hessian,activation_maximization]")
    if analyses.conv_kernels is not None:
        require(analyses.conv_kernels.normalize in ("tile", "grid"),
                f"invalid analysis.conv_kernels.normalize {analyses.conv_kernels.normalize!r}; use tile or grid")
    if analyses.landscape is not None:
        _validate_landscape(analyses.landscape)
    if analyses.hessian is not None:
        _validate_hessian(analyses.hessian, require)
    if analyses.activation_maximization is not None:
        validate_activation_maximization(analyses.activation_maximization)
    require(cfg.tracking.max_param_length >= 100,
            f"invalid tracking.max_param_length {cfg.tracking.max_param_length}: it must be at least 100 "
            "(MLflow servers accept 500 since version 1.28 and 6000 since 2.8)")
    for fmt in cfg.figures.formats:
        require(fmt in ("png", "pdf", "svg"), f"invalid figure format {fmt!r} in figures.formats; use png, pdf or svg")


def _check_finite(node: Any, where: str) -> None:
    """Reject NaN and infinite numbers anywhere under ``node``: no option of an analysis takes them."""
    if OmegaConf.is_dict(node):
        for key in node.keys():
            # Interpolations are left alone: ${hydra:...} resolves only inside a running job.
            if not OmegaConf.is_interpolation(node, key):
                _check_finite(node[key], f"{where}.{key}")
    elif OmegaConf.is_list(node):
        for index in range(len(node)):
            if not OmegaConf.is_interpolation(node, index):
                _check_finite(node[index], f"{where}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise VizpipeError(f"invalid {where} {node}: it must be a finite number")


def _validate_range(value: Any, key: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise VizpipeError(f"invalid {key} {value}: a single value r (for [-r, r]) must be positive")
        return
    valid_pair = isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if not valid_pair:
        raise VizpipeError(f"invalid {key} {value!r}: give a number r or a pair [min, max]")
    if not value[0] < value[1]:
        raise VizpipeError(f"invalid {key} {value}: the minimum {value[0]} must be below the maximum {value[1]}")


def _validate_landscape(land: DictConfig) -> None:
    prefix = "analysis.landscape"
    if land.dims not in (1, 2):
        raise VizpipeError(f"invalid {prefix}.dims {land.dims}: use 1 (a line) or 2 (a plane)")
    if land.resolution < 1:
        raise VizpipeError(f"invalid {prefix}.resolution {land.resolution}: it must be at least 1")
    _validate_range(_plain(land.noise_range), f"{prefix}.noise_range")
    if land.y_range is not None:
        _validate_range(_plain(land.y_range), f"{prefix}.y_range")
    if land.direction not in ("random", "target", "pca", "hessian"):
        raise VizpipeError(f"invalid {prefix}.direction {land.direction!r}; use random, target, pca or hessian")
    if land.normalization not in ("filter", "layer", "none"):
        raise VizpipeError(f"invalid {prefix}.normalization {land.normalization!r}; use filter, layer or none")
    if land.ignore not in ("biasbn", "none"):
        raise VizpipeError(f"invalid {prefix}.ignore {land.ignore!r}; use biasbn or none")
    if land.directions_from:
        return
    if land.direction == "target":
        count = len(land.targets or [])
        if count != land.dims:
            raise VizpipeError(
                f"{prefix}.direction=target with dims={land.dims} needs {land.dims} file(s) in {prefix}.targets, "
                f"got {count}"
            )
    if land.direction == "pca" and not land.trajectory:
        raise VizpipeError(f"{prefix}.direction=pca needs {prefix}.trajectory: a list of checkpoints or glob patterns")


def _validate_hessian(hess: DictConfig, require) -> None:
    prefix = "invalid analysis.hessian"
    require(hess.blocks or hess.top_k > 0 or hess.trace or hess.density,
            "analysis.hessian computes nothing; set blocks=true, top_k>0, trace=true or density=true")
    require(hess.method in ("power_iteration", "lanczos"), f"{prefix}.method {hess.method!r}; use power_iteration or lanczos")
    require(hess.group_by in ("parameter", "module"), f"{prefix}.group_by {hess.group_by!r}; use parameter or module")
    require(hess.curvature in ("hessian", "ggn"), f"{prefix}.curvature {hess.curvature!r}; use hessian or ggn")
    require(hess.which in ("magnitude", "extremes"), f"{prefix}.which {hess.which!r}; use magnitude or extremes")
    require(hess.top_k_method in TOP_K_METHODS, f"{prefix}.top_k_method {hess.top_k_method!r}; use {' or '.join(TOP_K_METHODS)}")
    for key in ("max_iterations", "top_k_max_iterations", "density_runs", "density_steps"):
        require(hess[key] >= 1, f"{prefix}.{key} {hess[key]}: it must be at least 1")
    for key in ("tol", "top_k_tol", "trace_relative_standard_error", "density_sigma"):
        require(hess[key] > 0, f"{prefix}.{key} {hess[key]}: it must be positive")
    require(hess.top_k >= 0, f"{prefix}.top_k {hess.top_k}: it must be 0 (off) or more")
    require(hess.top_k <= hess.top_k_max_iterations,
            f"{prefix}.top_k {hess.top_k} exceeds top_k_max_iterations {hess.top_k_max_iterations}; raise the latter")
    require(2 <= hess.trace_min_probes <= hess.trace_max_probes,
            f"{prefix}.trace_min_probes {hess.trace_min_probes}: it must be at least 2 and at most trace_max_probes")
    require(hess.density_grid_points >= 2, f"{prefix}.density_grid_points {hess.density_grid_points}: it must be at least 2")


def validate_activation_maximization(am: DictConfig) -> None:
    """Check the activation-maximization options; raise ``VizpipeError`` on the first bad one."""
    prefix = "analysis.activation_maximization"
    checks = [
        (am.iterations >= 1, f"invalid {prefix}.iterations {am.iterations}: it must be at least 1"),
        (am.lr > 0, f"invalid {prefix}.lr {am.lr}: it must be positive"),
        (am.frame_every >= 1, f"invalid {prefix}.frame_every {am.frame_every}: it must be at least 1"),
        (am.batch_size >= 1, f"invalid {prefix}.batch_size {am.batch_size}: it must be at least 1"),
        (am.images_per_channel >= 1, f"invalid {prefix}.images_per_channel {am.images_per_channel}: it must be at least 1"),
        (am.tv_weight >= 0, f"invalid {prefix}.tv_weight {am.tv_weight}: it must be >= 0"),
        (am.l2_weight >= 0, f"invalid {prefix}.l2_weight {am.l2_weight}: it must be >= 0"),
        (am.diversity_weight >= 0, f"invalid {prefix}.diversity_weight {am.diversity_weight}: it must be >= 0"),
        (am.objective in ("channel", "neuron"), f"invalid {prefix}.objective {am.objective!r}; use channel or neuron"),
        (am.parameterization in ("pixel", "fourier"),
         f"invalid {prefix}.parameterization {am.parameterization!r}; use pixel or fourier"),
        (am.jitter >= 0, f"invalid {prefix}.jitter {am.jitter}: it must be 0 (off) or a number of pixels"),
        (am.blur_every >= 0, f"invalid {prefix}.blur_every {am.blur_every}: it must be 0 (off) or positive"),
        (am.blur_sigma > 0, f"invalid {prefix}.blur_sigma {am.blur_sigma}: it must be positive"),
        (0 <= am.norm_crop < 100, f"invalid {prefix}.norm_crop {am.norm_crop}: give a percentile in [0, 100)"),
        (0 <= am.contribution_crop < 100,
         f"invalid {prefix}.contribution_crop {am.contribution_crop}: give a percentile in [0, 100)"),
        (len(am.scale) == 2 and 0 < am.scale[0] <= am.scale[1],
         f"invalid {prefix}.scale {list(am.scale)}: give [min, max] with 0 < min <= max"),
        (am.norm_constraint is None or am.norm_constraint > 0,
         f"invalid {prefix}.norm_constraint {am.norm_constraint}: it must be positive or null"),
        (am.position is None or len(am.position) == 2,
         f"invalid {prefix}.position {am.position}: give [row, column] or null for the center"),
    ]
    for condition, message in checks:
        if not condition:
            raise VizpipeError(message)
    if am.parameterization == "fourier":
        pixel_only = [name for name in ("blur_every", "norm_crop", "contribution_crop", "norm_constraint") if am[name]]
        if pixel_only:
            raise VizpipeError(
                f"{prefix}.{pixel_only[0]} changes pixels in place and needs {prefix}.parameterization=pixel"
            )
    layers = OmegaConf.to_object(am.layers) if OmegaConf.is_config(am.layers) else am.layers
    if not (layers is None or layers == "all_conv" or (isinstance(layers, list) and all(isinstance(v, str) for v in layers))):
        raise VizpipeError(f"invalid {prefix}.layers {layers!r}: use all_conv or a list of module names, e.g. [conv1,conv2]")
    parse_channels(am.channels)


def parse_channels(value: Any) -> list[int] | None:
    """Turn the ``channels`` option into a list of indices, or None for all.

    Accepts None or "all", an int, a list of ints, or a range "start:stop[:step]"
    with Python's slice meaning (stop excluded).
    """
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    if value is None or value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    if isinstance(value, str) and ":" in value:
        parts = value.split(":")
        try:
            numbers = [int(part) for part in parts]
        except ValueError:
            numbers = []
        if len(numbers) in (2, 3) and (len(numbers) == 2 or numbers[2] > 0) and numbers[0] >= 0:
            indices = list(range(*numbers))
            if indices:
                return indices
    raise VizpipeError(
        f"invalid analysis.activation_maximization.channels {value!r}: use all, an integer, a list of integers "
        "or a non-empty range start:stop[:step] such as '0:16'"
    )


def activation_maximization_layers(am: DictConfig, model: nn.Module) -> list[str]:
    """Return the layer names the ``layers`` option selects: a list, or every Conv2d for all_conv."""
    layers = OmegaConf.to_object(am.layers) if OmegaConf.is_config(am.layers) else am.layers
    if layers is None or layers == "all_conv":
        names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        if not names:
            raise VizpipeError(
                f"{type(model).__name__} has no Conv2d layer; set analysis.activation_maximization.layers to a list of module names"
            )
        return names
    return list(layers)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise VizpipeError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise VizpipeError(f"device={name} requested but CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VizpipeError(f"device={name} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _instantiate(node: DictConfig, what: str) -> Any:
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, VizpipeError):
            raise cause
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise VizpipeError(f"cannot build the {what} from _target_ {target}: {message}; check the {what} config") from error


def check_model_fits(model: nn.Module, dataset: ImageDataset, loss_fn, device: torch.device) -> None:
    """Run a few samples through the model and the loss so shape mismatches fail before any work.

    The samples include those with the largest label of each split, so a
    model with too few outputs for the dataset's classes fails here too.
    """
    inputs = torch.cat([dataset.x_test[:2], dataset.x_test[[int(dataset.y_test.argmax())]],
                        dataset.x_train[[int(dataset.y_train.argmax())]]]).to(device)
    targets = torch.cat([dataset.y_test[:2], dataset.y_test.max().view(1), dataset.y_train.max().view(1)]).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(inputs)
    except RuntimeError as error:
        raise VizpipeError(
            f"{type(model).__name__} rejects images of shape {dataset.image_shape} "
            f"({str(error).splitlines()[0]}); change dataset.image_shape or the model config"
        ) from error
    finally:
        model.train(was_training)
    try:
        loss_fn(outputs, targets)
    except (RuntimeError, ValueError, IndexError) as error:
        raise VizpipeError(
            f"model output of shape {list(outputs.shape[1:])} per sample does not fit the loss "
            f"{type(loss_fn).__name__} with labels up to {int(targets.max())} ({str(error).splitlines()[0]}); "
            f"set model.class_number to {dataset.num_classes}, the dataset's class count, or fix the loss config"
        ) from error
    for split in ("train", "test"):
        images = dataset.split(split)[0]
        bad = (~torch.isfinite(images.flatten(1))).any(dim=1).nonzero().flatten()
        if len(bad):
            raise VizpipeError(
                f"dataset {dataset.name}: {len(bad)} {split} image(s) contain NaN or infinite values "
                f"(first at index {int(bad[0])}); clean the data or fix the dataset's preprocessing"
            )


def check_layers(cfg: DictConfig, model: nn.Module, image_shape: list[int], device: torch.device) -> None:
    """Fail on unknown layers before any training or analysis starts."""
    kernels = cfg.analysis.conv_kernels
    if kernels is not None and kernels.layers is not None:
        for name in kernels.layers:
            try:
                find_layer(model, name, (nn.Conv2d,), "conv kernels")
            except VizpipeError as error:
                raise VizpipeError(f"{error} Fix analysis.conv_kernels.layers, or set it to null for every Conv2d") from None
    elif kernels is not None and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise VizpipeError(
            f"{type(model).__name__} has no Conv2d layer to draw kernels of; drop conv_kernels from analysis=[...]"
        )
    hessian = cfg.analysis.hessian
    if hessian is not None:
        names = [name for name, _ in model.named_parameters()]
        for key in ("include", "exclude"):
            for pattern in hessian[key] or []:
                if not fnmatch.filter(names, pattern):
                    raise VizpipeError(
                        f"analysis.hessian.{key} pattern {pattern!r} matches no parameter. {suggest(pattern, names)}"
                    )
        # Every pattern matches, but the selection can still be empty (all excluded, or only frozen ones).
        select_parameters(model, hessian.include, hessian.exclude)
    am = cfg.analysis.activation_maximization
    if am is not None:
        channels = parse_channels(am.channels)
        if channels is not None and not channels:
            raise VizpipeError("analysis.activation_maximization.channels is empty; use all, an index or a list of indices")
        for name in activation_maximization_layers(am, model):
            module = find_layer(model, name, purpose="activation maximization")
            if channels is None:
                continue
            available = count_channels(model, module, image_shape, device)
            bad = [c for c in channels if not 0 <= c < available]
            if bad:
                raise VizpipeError(
                    f"channel(s) {bad} out of range for layer {name!r}, which has {available} channels "
                    f"(0..{available - 1}); fix analysis.activation_maximization.channels"
                )


def _subset(x: torch.Tensor, y: torch.Tensor, max_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (x, y) if max_samples is None else (x[:max_samples], y[:max_samples])


def prepare_weights(
    cfg: DictConfig, model: nn.Module, dataset: ImageDataset, loss_fn, device, run_dir: Path, results_path: Path,
    resuming: bool = False,
) -> dict[str, float]:
    """Initialize or train the model as ``cfg.weights`` specifies; return training metrics.

    A ``weights.source=checkpoint`` model is loaded earlier, by ``_run_steps``.

    When resuming a run folder whose training finished, the saved
    ``checkpoint.pt`` is loaded instead of training again. Under torchrun only
    rank 0 trains; every rank then receives rank 0's weights.
    """
    metrics = _prepare_weights_on_rank(cfg, model, dataset, loss_fn, device, run_dir, results_path, resuming)
    distributed.broadcast_module(model)
    return metrics


def _prepare_weights_on_rank(cfg, model, dataset, loss_fn, device, run_dir, results_path, resuming) -> dict[str, float]:
    weights = cfg.weights
    if weights.source == "checkpoint":
        return {}  # loaded by _run_steps before results.h5 was created
    if weights.source == "random":
        log.info("Using the seeded random initialization (seed %d)", cfg.seed)
        return {}
    if not distributed.is_main():
        return {}

    checkpoint = run_dir / "checkpoint.pt"
    if resuming and checkpoint.is_file():
        attrs = store.read_group_attrs(results_path, "training")
        if attrs is not None and attrs.get("complete"):
            log.info("Resuming: loading the weights trained earlier from %s", checkpoint)
            load_checkpoint(model, checkpoint)
            model.to(device)
            return json.loads(attrs.get("metrics_json", "{}"))

    log.info("Training %s on %s for %d epochs", type(model).__name__, dataset.name, weights.epochs)
    on_epoch_end = None
    if weights.save_every_epoch:
        trajectory_dir = run_dir / "checkpoints"
        trajectory_dir.mkdir(exist_ok=True)

        def on_epoch_end(epoch: int, trained: nn.Module) -> None:
            save_state_dict(trained, trajectory_dir / f"epoch_{epoch:03d}.pt")

    history = train(
        model, dataset, loss_fn, weights.epochs, weights.lr, weights.batch_size,
        weights.weight_decay, cfg.seed, device, cfg.progress, on_epoch_end,
    )
    metrics = {
        "train/accuracy": history.train_accuracy[-1],
        "train/loss": history.train_loss[-1],
        "test/accuracy": history.test_accuracy[-1],
    }
    if weights.save_checkpoint:
        save_state_dict(model, checkpoint)
        log.info("Saved the trained weights to %s", checkpoint)
    store.write_group(
        results_path,
        "training",
        {"train_loss": history.train_loss, "train_accuracy": history.train_accuracy, "test_accuracy": history.test_accuracy},
        {
            "epochs": weights.epochs, "lr": weights.lr, "batch_size": weights.batch_size, "optimizer": "Adam",
            "complete": True, "metrics_json": json.dumps(metrics),
        },
    )
    return metrics


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config without the keys in ``CONFIG_HASH_EXCLUDED``."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in CONFIG_HASH_EXCLUDED:
        container.pop(key, None)
    text = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_results_file(cfg: DictConfig, path: Path, config_yaml: str, model_class: str, dataset_name: str) -> bool:
    """Create results.h5, or keep an existing one of the same config; return True when resuming.

    An existing file of another config (or one that cannot be read) is an
    error unless ``overwrite=true``. Only rank 0 touches the file.
    """
    if not distributed.is_main():
        return False
    digest = config_hash(cfg)
    if path.exists():
        try:
            stored = store.read_root_attrs(path).get("config_hash")
        except (OSError, VizpipeError):
            stored = None
        if stored == digest:
            log.info("Resuming the job in %s: finished analyses are kept", path.parent)
            if store.recover_after_crash(path):
                log.info("Recovered %s after its writer was killed", path)
            return True
        if not cfg.overwrite:
            raise VizpipeError(
                f"{path} contains results of another config or cannot be read; use a new run folder, "
                "or overwrite=true to replace it"
            )
        log.warning("Replacing %s (overwrite=true)", path)
    store.create_results_file(
        path, {"config_yaml": config_yaml, "config_hash": digest, "model_class": model_class, "dataset": dataset_name}
    )
    return False


def check_fingerprint(model: nn.Module, results_path: Path, resuming: bool) -> None:
    """Store the weight fingerprint; when resuming, require the weights of the interrupted run."""
    if not distributed.is_main():
        return
    fingerprint = weight_fingerprint(model)
    if resuming:
        stored = store.read_root_attrs(results_path).get("weight_fingerprint")
        if stored is not None and stored != fingerprint:
            raise VizpipeError(
                f"the model weights (fingerprint {fingerprint}) differ from those of the interrupted run in "
                f"{results_path.parent} ({stored}); rerun in a new run folder"
            )
    store.write_root_attrs(results_path, {"weight_fingerprint": fingerprint})
    log.info("Model weights fingerprint %s", fingerprint)


def finished_metrics(results_path: Path, group: str) -> dict[str, float] | None:
    """Return the stored metrics of ``group`` if it was completed by an earlier run, else None."""
    if not distributed.is_main():
        return None
    attrs = store.read_group_attrs(results_path, group)
    if attrs is None or attrs.get("complete") is not True:
        return None
    return json.loads(attrs.get("metrics_json", "{}"))


def run_job(cfg: DictConfig, run_dir: Path, run_name: str | None = None, sweep: SweepInfo | None = None) -> JobSummary:
    """Run one job end to end and return where its outputs are.

    Order matters for safety. The MLflow run starts first, so a job that fails
    on a bad value is still recorded (FAILED, with its error). The config and
    layers are checked before any training, and results.h5 is written before
    anything is logged to MLflow. The run always ends, as FAILED or KILLED when
    the job stops early. ``sweep`` makes the run a child of the sweep's parent.
    A run folder whose results.h5 came from the same config is resumed:
    finished analyses are kept and a partial landscape continues where it
    stopped. Under torchrun, rank 0 alone locks the folder, writes and tracks.
    """
    if distributed.launched_by_torchrun():
        distributed.initialize(resolve_device(cfg.device))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = store.FileLock(run_dir / "results.h5") if distributed.is_main() else contextlib.nullcontext()
    with lock:
        return _run_tracked_job(cfg, run_dir, run_name, sweep)


def _run_tracked_job(cfg: DictConfig, run_dir: Path, run_name: str | None, sweep: SweepInfo | None) -> JobSummary:
    started = time.perf_counter()
    results_path = run_dir / "results.h5"
    tracker = Tracker(
        cfg.tracking.enabled and distributed.is_main(), cfg.tracking.tracking_uri, cfg.tracking.experiment_name,
        cfg.output_root, run_dir, cfg.tracking.max_param_length,
    )
    analyses = [name for name in ANALYSIS_ORDER if cfg.analysis[name] is not None]
    run_name = cfg.tracking.run_name or run_name or job_run_name(analyses, [])
    tags = {"vizpipe.run_dir": str(run_dir.resolve()), "vizpipe.host": f"{socket.gethostname()}:{os.getpid()}"}
    tracker.start(run_name, _config_params(cfg), tags, sweep)
    tracker.end_stale_runs()
    summary = JobSummary(run_dir=run_dir, results_path=results_path, tracking_uri=tracker.uri, run_id=tracker.run_id)
    status = "FAILED"
    try:
        _run_steps(cfg, run_dir, results_path, summary, tracker)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        log.error("Interrupted; finished analyses are kept in %s", results_path)
        raise
    except OSError as error:
        if error.errno not in store.NO_SPACE_ERRNOS:
            tracker.record_error(error)
            raise
        no_space = VizpipeError(
            f"writing {error.filename or run_dir} failed: {error.strerror} [errno {error.errno}]; free disk space "
            f"and rerun the same command with hydra.run.dir={run_dir}: finished analyses are kept"
        )
        tracker.record_error(no_space)
        raise no_space from error
    except Exception as error:
        tracker.record_error(error)
        raise
    finally:
        tracker.end(status, sweep)
        if not tracker.enabled:
            summary.run_id = None  # tracking failed part way, so the run must be logged again later
        summary.status = status
        summary.seconds = time.perf_counter() - started
        if distributed.is_main():
            try:
                _write_job_record(run_dir / JOB_RECORD, summary, run_name)
            except OSError as error:
                # Raising here would hide the job's own error; the record only serves vizpipe-log.
                log.error("Writing %s failed (%s); vizpipe-log will treat the job as failed", run_dir / JOB_RECORD, error)
    log.info("Job finished in %.1f s", summary.seconds)
    return summary


def _config_params(cfg: DictConfig) -> dict[str, Any]:
    """Return the resolved config as a plain dict, or the unresolved one when an interpolation fails."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - the job itself reports the bad interpolation
        return OmegaConf.to_container(cfg, resolve=False)


def _write_job_record(path: Path, summary: JobSummary, run_name: str) -> None:
    """Write how the job ended and its metrics, for the summary table and for ``vizpipe-log``."""
    record = {
        "status": summary.status,
        "run_name": run_name,
        "seconds": round(summary.seconds, 3),
        "metrics": summary.metrics,
        "results": summary.results_path.name if summary.results_path.is_file() else None,
        "figures": [str(path.relative_to(summary.run_dir)) for path in summary.figures],
        "mlflow_run_id": summary.run_id,
        "tracking_uri": summary.tracking_uri,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _run_steps(cfg: DictConfig, run_dir: Path, results_path: Path, summary: JobSummary, tracker: Tracker) -> None:
    validate(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    # 1. Data, model and loss, each checked before any work.
    log.info("Building dataset %s", cfg.dataset.get("_target_"))
    dataset = _instantiate(cfg.dataset, "dataset")
    if not isinstance(dataset, ImageDataset):
        raise VizpipeError(f"dataset _target_ {cfg.dataset.get('_target_')} returned a {type(dataset).__name__}, expected vizpipe.data.ImageDataset")
    log.info("Building model %s", cfg.model.get("_target_"))
    model = _instantiate(cfg.model, "model")
    if not isinstance(model, nn.Module):
        raise VizpipeError(f"model _target_ {cfg.model.get('_target_')} returned a {type(model).__name__}, expected a torch.nn.Module")
    model.to(device)
    loss_fn = _instantiate(cfg.loss, "loss")
    check_model_fits(model, dataset, loss_fn, device)
    check_layers(cfg, model, dataset.image_shape, device)
    if cfg.weights.source == "checkpoint":
        # Loaded before results.h5 exists, so a bad checkpoint leaves nothing behind.
        log.info("Loading checkpoint %s", cfg.weights.checkpoint)
        load_checkpoint(model, cfg.weights.checkpoint)
        model.to(device)

    # 2. Weights.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    resuming = open_results_file(cfg, results_path, config_yaml, type(model).__name__, dataset.name)
    summary.metrics.update(prepare_weights(cfg, model, dataset, loss_fn, device, run_dir, results_path, resuming))
    check_fingerprint(model, results_path, resuming)

    # 3. The evaluation set, on the device once.
    x_eval, y_eval = _subset(*dataset.split(cfg.evaluation.split), cfg.evaluation.max_samples)
    x_eval, y_eval = x_eval.to(device), y_eval.to(device)
    log.info("Evaluation set: %d %s samples of shape %s", len(x_eval), cfg.evaluation.split, list(x_eval.shape[1:]))

    # 4. Analyses, each written as soon as it finishes; complete ones of a resumed job are kept.
    for name in ANALYSIS_ORDER:
        options = cfg.analysis[name]
        if options is None:
            continue
        if not distributed.is_main() and name not in SHARDED_ANALYSES:
            continue
        stored = finished_metrics(results_path, name) if resuming else None
        if stored is not None:
            log.info("Skipping %s: its results are already complete in %s", name, results_path)
            summary.metrics.update(stored)
            tracker.log_metrics(stored)
            continue
        log.info("Running %s", name)
        metrics = ANALYSIS_STEPS[name](options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path)
        if distributed.is_main():
            store.write_group_attrs(results_path, name, {"complete": True, "metrics_json": json.dumps(metrics)})
        summary.metrics.update(metrics)
        tracker.log_metrics(metrics)
        log.info("Finished %s", name)

    # 5. Figures and artifacts, from rank 0.
    if not distributed.is_main():
        return
    if cfg.figures.enabled:
        summary.figures = _render(results_path, run_dir / "figures", list(cfg.figures.formats))
    tracker.log_metrics({k: v for k, v in summary.metrics.items() if k.startswith(("train/", "test/"))})
    tracker.log_artifact(results_path)
    tracker.log_artifact(run_dir / "figures", "figures")
    tracker.log_artifact(run_dir / ".hydra", ".hydra")
    am = cfg.analysis.activation_maximization
    if am is not None and cfg.figures.enabled:
        # The grids again through MLflow's image API, which the UI shows as images rather than files.
        for layer in activation_maximization_layers(am, model):
            tracker.log_image(run_dir / "figures" / f"{grid_figure_stem(layer)}.png", f"activation_maximization/{layer}")


def _render(results_path: Path, figures_dir: Path, formats: list[str]) -> list[Path]:
    try:
        figures = render_results(results_path, figures_dir, formats)
    except Exception as error:  # noqa: BLE001 - results.h5 is already complete; rendering can be redone later
        log.error(
            "Rendering figures failed (%s: %s); results are intact, retry with: vizpipe-figures source=%s",
            type(error).__name__, error, results_path,
        )
        return []
    log.info("Wrote %d figure files to %s", len(figures), figures_dir)
    return figures


def _run_conv_kernels(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    result = conv_kernels(model, list(options.layers) if options.layers is not None else None)
    for group, datasets, attrs in records.conv_kernels_records(result, options.normalize):
        store.write_group(results_path, group, datasets, attrs)
    return {}


def _plain(value: Any) -> Any:
    return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value


def expand_paths(patterns: list[str], what: str) -> list[str]:
    """Expand glob patterns in order (each pattern's matches sorted); plain paths stay as given."""
    paths = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(str(Path(pattern).expanduser())))
            if not matches:
                raise VizpipeError(f"{what}: no file matches {pattern!r}")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


def landscape_directions(options, cfg: DictConfig, model: nn.Module, eval_batches=None, loss_fn=None) -> Directions:
    """Build the directions the landscape config requests (random, target, PCA, Hessian, or from a results file)."""
    if options.directions_from:
        source = resolve_results_path(options.directions_from)
        results = store.read_results(source)
        if "landscape" not in results:
            raise VizpipeError(f"{source} contains no landscape, so it has no directions to reuse")
        directions = records.directions_from_group(results["landscape"], results.group_attrs["landscape"])
        include_buffers = any(name not in dict(model.named_parameters()) for name in directions.names)
        try:
            check_fits(state_entries(model, include_buffers), directions, options.dims)
        except VizpipeError as error:
            raise VizpipeError(f"directions from {source}: {error}") from error
        log.info("Reusing the %dD %s directions of %s", directions.dims, directions.kind, source)
        return directions
    if options.direction == "random":
        return random_directions(
            model, options.dims, cfg.seed, options.normalization, options.ignore, bool(options.include_buffers)
        )
    if options.direction == "hessian":
        log.info("Computing the top-%d Hessian eigenvectors as landscape directions", options.dims)
        # Each torchrun rank passes its share of the batches; the operator sums the products over ranks.
        mine = [eval_batches[i] for i in distributed.shard(len(eval_batches))]
        top = hessian_top_eigenvalues(
            model, mine, loss_fn, k=options.dims, max_iterations=100, tol=1e-6, seed=cfg.seed,
            eigenvectors=True, progress=cfg.progress,
        )
        names = [name for name, _ in model.named_parameters()]
        vectors = eigenvector_directions(model, top)[: options.dims]
        return Directions(names, vectors, "hessian", {"hessian_eigenvalues": top.eigenvalues[: options.dims].float()})
    if options.direction == "target":
        targets = [read_state_dict(path, "target checkpoint") for path in options.targets]
        include_buffers = True if options.include_buffers is None else options.include_buffers
        return target_directions(model, targets, include_buffers)
    paths = expand_paths(list(options.trajectory), "analysis.landscape.trajectory")
    log.info("PCA of a trajectory of %d checkpoints", len(paths))
    states = [read_state_dict(path, "trajectory checkpoint") for path in paths]
    return pca_directions(model, states, options.dims, options.ignore)


def _resume_landscape(results_path: Path, shape: tuple[int, ...]):
    """Return (directions, (loss, accuracy, done), group attributes) of an unfinished landscape in the file, or None."""
    if not distributed.is_main():
        return None
    attrs = store.read_group_attrs(results_path, "landscape")
    if attrs is None or attrs.get("complete") is True:
        return None
    results = store.read_results(results_path)
    group = results["landscape"]
    if tuple(np.shape(group["done"])) != shape:
        return None
    state = tuple(torch.from_numpy(np.asarray(group[key])) for key in ("loss", "accuracy", "done"))
    return records.directions_from_group(group, attrs), state, attrs


def _share_resume_state(state, shape: tuple[int, ...]):
    """Give every torchrun rank rank 0's resume arrays (or None when rank 0 has none)."""
    if distributed.world_size() == 1:
        return state
    flag = distributed.broadcast(torch.tensor([0 if state is None else 1]))
    if int(flag) == 0:
        return None
    if state is None:
        state = (torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.bool))
    loss, accuracy, done = (t.clone() for t in state)
    distributed.broadcast(loss.double())
    distributed.broadcast(accuracy.double())
    done_bytes = distributed.broadcast(done.to(torch.uint8))
    return loss, accuracy, done_bytes.bool()


def _run_landscape(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    x, y = _subset(x_eval, y_eval, options.max_samples)
    noise_range, y_range = _plain(options.noise_range), _plain(options.y_range)
    xs = coordinates(noise_range, options.resolution)
    ys = coordinates(noise_range if y_range is None else y_range, options.resolution) if options.dims == 2 else None
    shape = (len(xs),) if ys is None else (len(ys), len(xs))
    attrs = {
        "log_scale": options.log_scale, "max_val": options.max_val, "normalization": options.normalization,
        "ignore": options.ignore, "seed": cfg.seed, "dims": options.dims,
    }

    eval_batches = batches(x, y, cfg.evaluation.batch_size)
    directions = landscape_directions(options, cfg, model, eval_batches, loss_fn)
    resumed = _resume_landscape(results_path, shape)
    state = None
    compile_option, channels_last = options.compile, options.channels_last
    if resumed is not None:
        directions, state, stored = resumed
        log.info("Resuming the landscape: %d of %d points are done", int(state[2].sum()), state[2].numel())
        # The interrupted run's automatic choices, so the resumed points match it to the last bit.
        if compile_option is None and "compiled" in stored:
            compile_option = bool(stored["compiled"])
        if channels_last is None and "channels_last" in stored:
            channels_last = bool(stored["channels_last"])
    elif distributed.is_main():
        store.write_group(results_path, *records.landscape_skeleton(xs, ys, directions, {**attrs, "kind": directions.kind}))
    state = _share_resume_state(state, shape)

    writer = store.PointWriter(results_path, "landscape") if distributed.is_main() else contextlib.nullcontext()
    with writer as point_writer:

        def on_point(index, loss, accuracy):
            if point_writer is not None:
                point_writer.write(index, loss, accuracy)
            interrupts.raise_if_requested()

        result = loss_landscape(
            model, eval_batches, loss_fn, noise_range=noise_range,
            resolution=options.resolution, dims=options.dims, y_range=y_range, directions=directions,
            compile=compile_option, channels_last=channels_last, progress=cfg.progress, resume=state,
            on_point=on_point,
            on_start=(lambda chosen: store.write_group_attrs(results_path, "landscape", chosen)) if distributed.is_main() else None,
        )
    metrics = records.landscape_metrics(result, options.summary_radius)
    if distributed.is_main():
        store.write_group(results_path, *records.landscape_record(result, attrs, metrics))
    diverged = int((result.done & ~torch.isfinite(result.loss)).sum())
    if diverged:
        log.warning("Landscape: %d of %d points diverged (NaN or inf loss); they are stored as is", diverged, result.loss.numel())
    return metrics


def _run_hessian(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    x, y = _subset(x_eval, y_eval, options.max_samples)
    all_batches = batches(x, y, cfg.evaluation.batch_size)
    # Under torchrun each rank takes its share of the batches; the products are summed over ranks.
    mine = [all_batches[i] for i in distributed.shard(len(all_batches))]

    selection = {
        "include": list(options.include) if options.include is not None else None,
        "exclude": list(options.exclude) if options.exclude is not None else None,
    }
    common = {"seed": cfg.seed, "progress": cfg.progress, "curvature": options.curvature, **selection}
    blocks = top = trace = density = None

    if options.blocks:
        blocks = hessian_block_eigenvalues(
            model, mine, loss_fn, method=options.method, max_iterations=options.max_iterations, tol=options.tol,
            group_by=options.group_by, which=options.which, verify=options.verify, **common,
        )
        if blocks.skipped:
            log.info("Hessian: skipped frozen parameters %s", ", ".join(blocks.skipped))
    if options.top_k > 0:
        top = hessian_top_eigenvalues(
            model, mine, loss_fn, k=options.top_k, max_iterations=options.top_k_max_iterations, tol=options.top_k_tol,
            eigenvectors=options.eigenvectors, method=options.top_k_method, **common,
        )
        log.info("Hessian top-%d eigenvalues: %s", options.top_k, ", ".join(f"{v:.4g}" for v in top.eigenvalues.tolist()))
    if options.trace:
        trace = hessian_trace(
            model, mine, loss_fn, max_probes=options.trace_max_probes, min_probes=options.trace_min_probes,
            relative_standard_error=options.trace_relative_standard_error, **common,
        )
        log.info("Hessian trace %.6g +- %.2g (%d probes)", trace.trace, trace.standard_error, len(trace.samples))
    if options.density:
        density = hessian_density(
            model, mine, loss_fn, runs=options.density_runs, steps=options.density_steps, sigma=options.density_sigma,
            grid_points=options.density_grid_points, **common,
        )

    if distributed.is_main():
        for record in records.hessian_records(blocks, top, trace, density):
            store.write_group(results_path, *record)
    return records.hessian_metrics(blocks, top, trace)


def _run_activation_maximization(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    """Optimize the images of each layer in turn, skipping the layers whose group is already complete.

    A layer's group gets ``complete=True`` and its metrics in a second write
    after the group itself is written and closed, so a group that a killed job
    left behind without that attribute is recomputed. Every layer starts from
    the same seed, so its images do not depend on which layers ran before.
    """
    metrics = {}
    channels = parse_channels(options.channels)
    color_correlation = None
    if options.parameterization == "fourier" and options.decorrelate:
        mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std).view(1, -1, 1, 1)
        color_correlation = color_correlation_sqrt(dataset.x_train[:2048] * std + mean)
    for layer in activation_maximization_layers(options, model):
        group = f"activation_maximization/{layer}"
        stored = finished_metrics(results_path, group)
        if stored is not None:
            log.info("Skipping activation maximization of %s: its group is already complete in %s", layer, results_path)
            metrics.update(stored)
            continue
        result = activation_maximization(
            model, layer, dataset.image_shape, channels=channels, iterations=options.iterations, lr=options.lr,
            objective=options.objective, position=None if options.position is None else list(options.position),
            negative=options.negative, images_per_channel=options.images_per_channel,
            diversity_weight=options.diversity_weight, parameterization=options.parameterization,
            color_correlation=color_correlation, tv_weight=options.tv_weight, l2_weight=options.l2_weight,
            weight_decay=options.weight_decay, blur_every=options.blur_every, blur_sigma=options.blur_sigma,
            jitter=options.jitter, scale=list(options.scale), rotation=options.rotation,
            norm_crop=options.norm_crop, contribution_crop=options.contribution_crop,
            norm_constraint=options.norm_constraint, mean=dataset.mean, std=dataset.std,
            init_std=options.init_std, clamp=options.clamp, frame_every=options.frame_every,
            batch_size=options.batch_size, seed=cfg.seed, compile=options.compile, progress=cfg.progress,
        )
        layer_metrics = records.activation_maximization_metrics(result)
        store.write_group(results_path, *records.activation_maximization_record(result))
        store.write_group_attrs(results_path, group, {"complete": True, "metrics_json": json.dumps(layer_metrics)})
        log.info(
            "Activation maximization %s: %d images, mean activation %.3g -> %.3g",
            layer, len(result.channels), float(result.start_activations.mean()), float(result.final_activations.mean()),
        )
        metrics.update(layer_metrics)
    return metrics


# Each step runs one analysis, writes its groups to results.h5 and returns its MLflow metrics.
ANALYSIS_STEPS = {
    "conv_kernels": _run_conv_kernels,
    "landscape": _run_landscape,
    "hessian": _run_hessian,
    "activation_maximization": _run_activation_maximization,
}
