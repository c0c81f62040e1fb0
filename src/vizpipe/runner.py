"""One vizpipe job: build the model and data, run the selected analyses, then
write results.h5, log to MLflow and render the figures."""

from __future__ import annotations

import logging
import random
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

from vizpipe import records, store
from vizpipe.analyses import (
    activation_maximization,
    conv_kernels,
    hessian_block_eigenvalues,
    loss_landscape,
)
from vizpipe.analyses.activation_maximization import count_channels
from vizpipe.analyses.am.parameterizations import color_correlation_sqrt
from vizpipe.analyses.landscape import coordinates
from vizpipe.analyses.modules import find_layer
from vizpipe.data.base import ImageDataset, batches
from vizpipe.errors import VizpipeError
from vizpipe.render import render_results
from vizpipe.tracking import Tracker
from vizpipe.training import load_checkpoint, train, weight_fingerprint

log = logging.getLogger("vizpipe")

WEIGHT_SOURCES = ("random", "checkpoint", "train")
ANALYSIS_ORDER = ("conv_kernels", "landscape", "hessian", "activation_maximization")


@dataclass
class JobSummary:
    run_dir: Path
    results_path: Path
    figures: list[Path] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str | None = None
    run_id: str | None = None


def validate(cfg: DictConfig) -> None:
    """Check value ranges the schema's types cannot express; raise ``VizpipeError`` on the first bad one."""

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
        land = analyses.landscape
        noise_range = OmegaConf.to_object(land.noise_range) if OmegaConf.is_config(land.noise_range) else land.noise_range
        if not isinstance(noise_range, (int, float)) or isinstance(noise_range, bool):
            valid_pair = isinstance(noise_range, list) and len(noise_range) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in noise_range
            )
            require(valid_pair, f"invalid analysis.landscape.noise_range {noise_range!r}: give a number r or a pair [min, max]")
        elif noise_range <= 0:
            raise VizpipeError(f"invalid analysis.landscape.noise_range {noise_range}: a single value r must be positive")
        coordinates(noise_range, land.resolution)  # checks min < max and resolution >= 1
        require(land.normalization in ("filter", "layer", "none"),
                f"invalid analysis.landscape.normalization {land.normalization!r}; use filter, layer or none")
        require(land.ignore in ("biasbn", "none"), f"invalid analysis.landscape.ignore {land.ignore!r}; use biasbn or none")
    if analyses.hessian is not None:
        hess = analyses.hessian
        require(hess.method in ("power_iteration", "lanczos"),
                f"invalid analysis.hessian.method {hess.method!r}; use power_iteration or lanczos")
        require(hess.max_iterations >= 1, f"invalid analysis.hessian.max_iterations {hess.max_iterations}: it must be at least 1")
        require(hess.tol > 0, f"invalid analysis.hessian.tol {hess.tol}: it must be positive")
    if analyses.activation_maximization is not None:
        validate_activation_maximization(analyses.activation_maximization)
    for fmt in cfg.figures.formats:
        require(fmt in ("png", "pdf", "svg"), f"invalid figure format {fmt!r} in figures.formats; use png, pdf or svg")


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
    """Run two samples through the model and the loss so shape mismatches fail before any work."""
    inputs = dataset.x_test[:2].to(device)
    targets = dataset.y_test[:2].to(device)
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
            f"model output of shape {list(outputs.shape)} does not fit the loss {type(loss_fn).__name__} for "
            f"{dataset.num_classes} classes ({str(error).splitlines()[0]}); check model.class_number"
        ) from error
    if not torch.isfinite(dataset.x_test).all() or not torch.isfinite(dataset.x_train).all():
        raise VizpipeError(f"dataset {dataset.name} contains NaN or infinite inputs; clean the data first")


def check_layers(cfg: DictConfig, model: nn.Module, image_shape: list[int], device: torch.device) -> None:
    """Fail on unknown layers before any training or analysis starts."""
    kernels = cfg.analysis.conv_kernels
    if kernels is not None and kernels.layers is not None:
        for name in kernels.layers:
            find_layer(model, name, (nn.Conv2d,), "conv kernels")
    am = cfg.analysis.activation_maximization
    if am is not None:
        channels = parse_channels(am.channels)
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


def prepare_weights(cfg: DictConfig, model: nn.Module, dataset: ImageDataset, loss_fn, device, run_dir: Path, results_path: Path):
    """Initialize, load or train the model as ``cfg.weights`` says; return training metrics."""
    weights = cfg.weights
    if weights.source == "checkpoint":
        log.info("Loading checkpoint %s", weights.checkpoint)
        load_checkpoint(model, weights.checkpoint)
        model.to(device)
        return {}
    if weights.source == "random":
        log.info("Using the seeded random initialization (seed %d)", cfg.seed)
        return {}

    log.info("Training %s on %s for %d epochs", type(model).__name__, dataset.name, weights.epochs)
    history = train(
        model, dataset, loss_fn, weights.epochs, weights.lr, weights.batch_size,
        weights.weight_decay, cfg.seed, device, cfg.progress,
    )
    store.write_group(
        results_path,
        "training",
        {"train_loss": history.train_loss, "train_accuracy": history.train_accuracy, "test_accuracy": history.test_accuracy},
        {"epochs": weights.epochs, "lr": weights.lr, "batch_size": weights.batch_size, "optimizer": "Adam"},
    )
    if weights.save_checkpoint:
        checkpoint = run_dir / "checkpoint.pt"
        torch.save(model.state_dict(), checkpoint)
        log.info("Saved the trained weights to %s", checkpoint)
    return {
        "train/accuracy": history.train_accuracy[-1],
        "train/loss": history.train_loss[-1],
        "test/accuracy": history.test_accuracy[-1],
    }


def run_job(cfg: DictConfig, run_dir: Path, run_name: str | None = None) -> JobSummary:
    """Run one job end to end and return where its outputs are.

    Order matters for safety: the config and layers are checked before any
    training, results.h5 is written before anything is logged to MLflow, and the
    MLflow run is ended as FAILED or KILLED when the job stops early.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results_path = run_dir / "results.h5"
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

    # 2. Tracking, then weights.
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    tracker = Tracker(cfg.tracking.enabled, cfg.tracking.tracking_uri, cfg.tracking.experiment_name, cfg.output_root)
    tracker.start(cfg.tracking.run_name or run_name, OmegaConf.to_container(cfg, resolve=True), {"vizpipe.run_dir": str(run_dir.resolve())})
    summary = JobSummary(run_dir=run_dir, results_path=results_path, tracking_uri=tracker.uri, run_id=tracker.run_id)
    status = "FAILED"
    try:
        store.create_results_file(results_path, {"config_yaml": config_yaml, "model_class": type(model).__name__, "dataset": dataset.name})
        summary.metrics.update(prepare_weights(cfg, model, dataset, loss_fn, device, run_dir, results_path))
        fingerprint = weight_fingerprint(model)
        store.write_root_attrs(results_path, {"weight_fingerprint": fingerprint})
        log.info("Model weights fingerprint %s", fingerprint)

        # 3. The evaluation set, on the device once.
        x_eval, y_eval = _subset(*dataset.split(cfg.evaluation.split), cfg.evaluation.max_samples)
        x_eval, y_eval = x_eval.to(device), y_eval.to(device)
        log.info("Evaluation set: %d %s samples of shape %s", len(x_eval), cfg.evaluation.split, list(x_eval.shape[1:]))

        # 4. Analyses, each written as soon as it finishes.
        for name in ANALYSIS_ORDER:
            options = cfg.analysis[name]
            if options is None:
                continue
            log.info("Running %s", name)
            metrics = ANALYSIS_STEPS[name](options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path)
            summary.metrics.update(metrics)
            tracker.log_metrics(metrics)
            log.info("Finished %s", name)

        # 5. Figures and artifacts.
        if cfg.figures.enabled:
            summary.figures = _render(results_path, run_dir / "figures", list(cfg.figures.formats))
        tracker.log_metrics({k: v for k, v in summary.metrics.items() if k.startswith(("train/", "test/"))})
        tracker.log_artifact(results_path)
        tracker.log_artifact(run_dir / "figures", "figures")
        tracker.log_artifact(run_dir / ".hydra", ".hydra")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        log.error("Interrupted; finished analyses are kept in %s", results_path)
        raise
    finally:
        tracker.end(status)
    log.info("Job finished in %.1f s", time.perf_counter() - started)
    return summary


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


def _run_landscape(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    x, y = _subset(x_eval, y_eval, options.max_samples)
    noise_range = OmegaConf.to_object(options.noise_range) if OmegaConf.is_config(options.noise_range) else options.noise_range
    result = loss_landscape(
        model, batches(x, y, cfg.evaluation.batch_size), loss_fn, noise_range=noise_range,
        resolution=options.resolution, normalization=options.normalization, ignore=options.ignore,
        seed=cfg.seed, progress=cfg.progress,
    )
    store.write_group(results_path, *records.landscape_record(result, options.log_scale, options.max_val))
    diverged = int((~torch.isfinite(result.loss)).sum())
    if diverged:
        log.warning("Landscape: %d of %d points diverged (NaN or inf loss); they are stored as is", diverged, result.loss.numel())
    return records.landscape_metrics(result)


def _run_hessian(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    x, y = _subset(x_eval, y_eval, options.max_samples)
    result = hessian_block_eigenvalues(
        model, batches(x, y, cfg.evaluation.batch_size), loss_fn, method=options.method,
        max_iterations=options.max_iterations, tol=options.tol,
        include=list(options.include) if options.include is not None else None, seed=cfg.seed, progress=cfg.progress,
    )
    if result.skipped:
        log.info("Hessian: skipped frozen parameters %s", ", ".join(result.skipped))
    store.write_group(results_path, *records.hessian_record(result))
    return records.hessian_metrics(result)


def _run_activation_maximization(options, cfg, model, dataset, loss_fn, x_eval, y_eval, results_path) -> dict[str, float]:
    metrics = {}
    channels = parse_channels(options.channels)
    color_correlation = None
    if options.parameterization == "fourier" and options.decorrelate:
        mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std).view(1, -1, 1, 1)
        color_correlation = color_correlation_sqrt(dataset.x_train[:2048] * std + mean)
    for layer in activation_maximization_layers(options, model):
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
        store.write_group(results_path, *records.activation_maximization_record(result))
        log.info(
            "Activation maximization %s: %d images, mean activation %.3g -> %.3g",
            layer, len(result.channels), float(result.start_activations.mean()), float(result.final_activations.mean()),
        )
        metrics.update(records.activation_maximization_metrics(result))
    return metrics


# Each step runs one analysis, writes its groups to results.h5 and returns its MLflow metrics.
ANALYSIS_STEPS = {
    "conv_kernels": _run_conv_kernels,
    "landscape": _run_landscape,
    "hessian": _run_hessian,
    "activation_maximization": _run_activation_maximization,
}
