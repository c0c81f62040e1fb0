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

from vizpipe import distributed, records, store
from vizpipe.analyses import (
    activation_maximization,
    conv_kernels,
    hessian_block_eigenvalues,
    loss_landscape,
)
from vizpipe.analyses.activation_maximization import count_channels
from vizpipe.analyses.hessian_spectrum import hessian_density, hessian_top_eigenvalues, hessian_trace
from vizpipe.analyses.landscape import coordinates
from vizpipe.analyses.modules import conv_layer_names, find_layer
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
        _validate_hessian(analyses.hessian, require)
    if analyses.activation_maximization is not None:
        am = analyses.activation_maximization
        require(am.iterations >= 1, f"invalid analysis.activation_maximization.iterations {am.iterations}: it must be at least 1")
        require(am.lr > 0, f"invalid analysis.activation_maximization.lr {am.lr}: it must be positive")
        require(am.frame_every >= 1, f"invalid analysis.activation_maximization.frame_every {am.frame_every}: it must be at least 1")
        require(am.batch_size >= 1, f"invalid analysis.activation_maximization.batch_size {am.batch_size}: it must be at least 1")
        require(am.tv_weight >= 0, f"invalid analysis.activation_maximization.tv_weight {am.tv_weight}: it must be >= 0")
        parse_channels(am.channels)
    for fmt in cfg.figures.formats:
        require(fmt in ("png", "pdf", "svg"), f"invalid figure format {fmt!r} in figures.formats; use png, pdf or svg")


def _validate_hessian(hess: DictConfig, require) -> None:
    prefix = "invalid analysis.hessian"
    require(hess.blocks or hess.top_k > 0 or hess.trace or hess.density,
            "analysis.hessian computes nothing; set blocks=true, top_k>0, trace=true or density=true")
    require(hess.method in ("power_iteration", "lanczos"), f"{prefix}.method {hess.method!r}; use power_iteration or lanczos")
    require(hess.group_by in ("parameter", "module"), f"{prefix}.group_by {hess.group_by!r}; use parameter or module")
    require(hess.curvature in ("hessian", "ggn"), f"{prefix}.curvature {hess.curvature!r}; use hessian or ggn")
    require(hess.which in ("magnitude", "extremes"), f"{prefix}.which {hess.which!r}; use magnitude or extremes")
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


def parse_channels(value: Any) -> list[int] | None:
    """Turn the ``channels`` option (None, "all", an int or a list of ints) into a list or None for all."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_object(value)
    if value is None or value == "all":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise VizpipeError(f"invalid analysis.activation_maximization.channels {value!r}: use all, an integer or a list of integers")


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
        if am.layers is None and not conv_layer_names(model):
            raise VizpipeError(
                f"{type(model).__name__} has no convolution layer; set analysis.activation_maximization.layers"
            )
        channels = parse_channels(am.channels)
        for name in am.layers if am.layers is not None else conv_layer_names(model):
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
            group_by=options.group_by, which=options.which, **common,
        )
        if blocks.skipped:
            log.info("Hessian: skipped frozen parameters %s", ", ".join(blocks.skipped))
    if options.top_k > 0:
        top = hessian_top_eigenvalues(
            model, mine, loss_fn, k=options.top_k, max_iterations=options.top_k_max_iterations, tol=options.top_k_tol,
            eigenvectors=options.eigenvectors, **common,
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
    metrics = {}
    layers = list(options.layers) if options.layers is not None else conv_layer_names(model)
    channels = parse_channels(options.channels)
    for layer in layers:
        result = activation_maximization(
            model, layer, dataset.image_shape, channels=channels, iterations=options.iterations,
            lr=options.lr, tv_weight=options.tv_weight, weight_decay=options.weight_decay,
            mean=dataset.mean, std=dataset.std, init_std=options.init_std, clamp=options.clamp,
            frame_every=options.frame_every, batch_size=options.batch_size, seed=cfg.seed, progress=cfg.progress,
        )
        store.write_group(results_path, *records.activation_maximization_record(result))
        log.info(
            "Activation maximization %s: %d channels, mean activation %.3g -> %.3g",
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
