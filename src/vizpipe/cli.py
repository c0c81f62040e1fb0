"""Command-line entry points: ``vizpipe`` runs a job, ``vizpipe-figures`` renders one."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vizpipe.config import register_configs
from vizpipe.errors import VizpipeError

log = logging.getLogger("vizpipe")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
register_configs()


def _fail(error: VizpipeError) -> None:
    """Report a user mistake as one line; in a multirun, re-raise so Hydra marks only this job failed."""
    log.error("%s", error)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise error
    print(f"vizpipe: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _run(cfg: DictConfig) -> None:
    from vizpipe.runner import run_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    run_name = ",".join(overrides)[:200] or "default"
    log.info("Run folder: %s", run_dir)
    try:
        summary = run_job(cfg, run_dir, run_name=run_name)
    except VizpipeError as error:
        _fail(error)
        return
    print(f"results: {summary.results_path}")
    if summary.figures:
        print(f"figures: {run_dir / 'figures'} ({len(summary.figures)} files)")
    if summary.run_id:
        print(f"mlflow run: {summary.run_id} in {summary.tracking_uri}")
        print(f"browse it with: mlflow ui --backend-store-uri {summary.tracking_uri}")


@hydra.main(version_base="1.3", config_path="conf", config_name="figures")
def _figures(cfg: DictConfig) -> None:
    from vizpipe.render import render_results

    try:
        paths = render_results(
            cfg.source, cfg.out_dir, list(cfg.formats), cfg.log_scale, cfg.max_val, cfg.kernel_normalize,
            cfg.hessian_symlog,
        )
    except VizpipeError as error:
        _fail(error)
        return
    for path in paths:
        print(path)


def main() -> None:
    _run()


def figures_main() -> None:
    _figures()
