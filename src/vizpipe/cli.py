"""Command-line entry points: ``vizpipe`` runs a job, ``vizpipe-figures`` renders figures,
``vizpipe-log`` logs finished run folders to MLflow."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vizpipe import interrupts
from vizpipe.config import register_configs
from vizpipe.errors import VizpipeError
from vizpipe.overrides import check_overrides, group_options, group_selections
from vizpipe.tracking import LOG_LATER_COMMAND, MAX_PARAM_LENGTH, SweepInfo, Tracker, job_run_name, override_key

if TYPE_CHECKING:
    from vizpipe.runner import JobSummary

log = logging.getLogger("vizpipe")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
register_configs()


def _fail(error: VizpipeError) -> None:
    """Report a user mistake as one line; in a multirun, re-raise so Hydra marks only this job failed."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.error("%s", error)
        raise error
    _log_to_files(logging.ERROR, str(error))
    print(f"vizpipe: error: {error}", file=sys.stderr)
    sys.exit(2)


def _log_to_files(level: int, message: str) -> None:
    """Write ``message`` to the log files only, so the console shows the ``vizpipe: error:`` line once."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _sweep_info(sweep_dir: Path, job_number: int, analyses: list[str], overrides: list[str]) -> SweepInfo:
    """Describe a multirun job, with the sweep's overrides read from multirun.yaml.

    ``overrides`` stand in for the sweep's when multirun.yaml is missing.
    """
    sweep_dir = sweep_dir.resolve()
    multirun_yaml = sweep_dir / "multirun.yaml"
    if multirun_yaml.is_file():
        overrides = _sweep_overrides(OmegaConf.load(multirun_yaml))
    overrides = [o for o in overrides if not override_key(o).startswith("hydra")]
    return SweepInfo(sweep_dir, job_number, overrides, _swept_keys(overrides), list(analyses))


def _sweep_overrides(multirun: DictConfig) -> list[str]:
    """Return a sweep's overrides as Hydra's basic sweeper combines them.

    The sweeper reads ``hydra.sweeper.params`` (which an experiment preset can
    set) and then the command line. A key given in both keeps its place and
    takes the command line's value.
    """
    params = OmegaConf.select(multirun, "hydra.sweeper.params", default=None)
    combined = [f"{key}={value}" for key, value in (OmegaConf.to_container(params) if params else {}).items()]
    combined += list(OmegaConf.select(multirun, "hydra.overrides.task", default=[]))
    by_key: dict[str, str] = {}
    for override in combined:
        by_key[override.split("=", 1)[0]] = override
    return list(by_key.values())


def _swept_keys(overrides: list[str]) -> set[str]:
    """Return the keys that a sweep varies (``key=a,b``, ``range()``, ``choice()``, ``glob()``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    swept = set()
    for override in overrides:
        try:
            parsed = parser.parse_override(override)
        except HydraException:
            continue  # another sweeper's syntax: the job runs anyway, so leave the key out of the names
        if parsed.is_sweep_override():
            swept.add(parsed.key_or_group)
    return swept


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _run(cfg: DictConfig) -> None:
    from vizpipe.runner import ANALYSIS_ORDER, run_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
    analyses = [name for name in ANALYSIS_ORDER if OmegaConf.select(cfg, f"analysis.{name}") is not None]
    sweep = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep = _sweep_info(Path(hydra_cfg.sweep.dir), int(hydra_cfg.job.num), analyses, overrides)
        # In a multirun, overrides.task contains the job's value of every swept key,
        # also of the sweeper's params. The child run is named by those alone.
        overrides = [o for o in overrides if override_key(o) in sweep.swept_keys]
    run_name = job_run_name(analyses, overrides)
    log.info("Run folder: %s", run_dir)
    # A scheduler's SIGTERM (SLURM at its time limit, say) stops the job like
    # Ctrl-C: partial results are kept and the MLflow run ends as KILLED.
    previous_handlers = interrupts.install()
    try:
        summary = run_job(cfg, run_dir, run_name=run_name, sweep=sweep)
    except VizpipeError as error:
        _fail(error)
        return
    except KeyboardInterrupt:
        print(
            f"vizpipe: interrupted; finished results are kept in {run_dir}. "
            f"Rerun the same command with hydra.run.dir={run_dir} to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    finally:
        interrupts.restore(previous_handlers)
    print(summary_table(summary))
    if summary.run_id:
        print(f"browse it with: mlflow ui --backend-store-uri {summary.tracking_uri}")


def summary_table(summary: JobSummary) -> str:
    """Format what a finished job computed and where it is, one ``label: value`` row per output."""
    rows = [("status", f"{summary.status} in {summary.seconds:.1f} s")]
    rows.append(("results", str(summary.results_path)))
    if summary.figures:
        rows.append((f"figures ({len(summary.figures)} files)", str(summary.run_dir / "figures")))
    checkpoint = summary.run_dir / "checkpoint.pt"
    if checkpoint.is_file():
        rows.append(("checkpoint", str(checkpoint)))
    for name, value in sorted(summary.metrics.items()):
        if name.endswith(("center_loss", "max_eigenvalue", "test/accuracy")) or name.endswith("mean_final_activation"):
            rows.append((name, f"{value:.6g}"))
    if summary.run_id:
        rows.append(("mlflow run", f"{summary.run_id} in {summary.tracking_uri}"))
    else:
        rows.append(("mlflow run", f"none; log it later with: {LOG_LATER_COMMAND} {summary.run_dir}"))
    return "\n".join(f"{label}: {value}" for label, value in rows)


@hydra.main(version_base="1.3", config_path="conf", config_name="figures")
def _figures(cfg: DictConfig) -> None:
    from vizpipe.render import render_results

    try:
        if cfg.figure is not None:
            paths = _paper_figure(cfg)
        elif cfg.source is None:
            raise VizpipeError("nothing to render: pass source=<run folder or results.h5>, or figure=<spec in conf/figure>")
        else:
            paths = render_results(
                cfg.source, cfg.out_dir, list(cfg.formats), cfg.log_scale, cfg.max_val, cfg.kernel_normalize,
                cfg.hessian_symlog,
            )
    except VizpipeError as error:
        _fail(error)
        return
    for path in paths:
        print(path)


def _paper_figure(cfg: DictConfig) -> list[Path]:
    """Render one figure spec and log it, with its source runs, to an MLflow figures run."""
    from vizpipe.render.figures import SUPPORTED_FORMATS
    from vizpipe.render.paper import KIND_ANALYSIS, load_panels, render_paper_figure
    from vizpipe.render.selection import check_selected_analysis, override_labels, select_jobs

    spec = cfg.figure
    unknown = [f for f in cfg.formats if f not in SUPPORTED_FORMATS]
    if unknown or not cfg.formats:
        raise VizpipeError(f"invalid figure formats {list(cfg.formats)}; use any of {', '.join(SUPPORTED_FORMATS)}")
    out_dir = Path(cfg.out_dir or "outputs/figures").expanduser()
    jobs = select_jobs(spec.select, out_dir / ".mlflow_downloads")
    # The override labels are the fallback that load_panels uses when figure.label names no config key.
    labels = override_labels(jobs)
    panels = load_panels([(job.source, job.results_path, label) for job, label in zip(jobs, labels)], spec.label)
    group = KIND_ANALYSIS.get(spec.kind)
    check_selected_analysis(spec, jobs, [group is None or group in panel.results for panel in panels])
    figure = render_paper_figure(panels, spec, cfg.style, out_dir, list(cfg.formats))
    sources_path = out_dir / f"{spec.name}_sources.json"
    listing = [{"source": source, "label": label} for source, label in zip(figure.sources, figure.labels)]
    sources_path.write_text(json.dumps({"figure": spec.name, "sources": listing}, indent=2) + "\n")

    if cfg.tracking.enabled:
        tracker = Tracker(True, cfg.tracking.tracking_uri or spec.select.tracking_uri, cfg.tracking.experiment_name, "outputs")
        tags = {"vizpipe.role": "figures", "vizpipe.source_runs": ",".join(figure.sources)}
        params = {"figure": OmegaConf.to_container(spec, resolve=True), "style": OmegaConf.to_container(cfg.style)}
        tracker.start(f"figure {spec.name}", params, tags)
        for path in figure.paths:
            tracker.log_artifact(path, "figures")
        tracker.log_artifact(sources_path)
        tracker.end("FINISHED")
        if tracker.run_id:
            print(f"mlflow figures run: {tracker.run_id} in {tracker.uri}")
    return [*figure.paths, sources_path]


def _log_job_folder(
    run_dir: Path, tracking_uri: str | None, experiment_name: str | None, sweep: SweepInfo | None, force: bool
) -> str | None:
    """Log a finished run folder as a new MLflow run; return its run id, or None when tracking failed.

    A folder that already has a run in the target experiment (an earlier
    ``vizpipe-log``, or the job's own run) is skipped unless ``force``.
    """
    from vizpipe.runner import JOB_RECORD

    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise VizpipeError(f"{config_path} not found; pass a vizpipe run folder (it holds .hydra/config.yaml and {JOB_RECORD})")
    cfg = OmegaConf.load(config_path)
    try:
        params = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - interpolations of Hydra's own resolvers cannot be resolved outside a job
        params = OmegaConf.to_container(cfg, resolve=False)
    record_path = run_dir / JOB_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    # A failure here leaves the folder unlogged, and rerunning the same command would fail again.
    if tracking_uri:
        hint = f"{run_dir} is not logged; check that {tracking_uri} is reachable and run {LOG_LATER_COMMAND} again"
    else:
        hint = (
            f"{run_dir} is not logged; the job's own tracking store is unreachable, "
            "so pass --tracking-uri with a store that is reachable"
        )
    tracker = Tracker(
        True,
        tracking_uri or OmegaConf.select(cfg, "tracking.tracking_uri"),
        experiment_name or OmegaConf.select(cfg, "tracking.experiment_name", default="vizpipe"),
        OmegaConf.select(cfg, "output_root", default="outputs"),
        run_dir,
        OmegaConf.select(cfg, "tracking.max_param_length", default=MAX_PARAM_LENGTH),
        failure_hint=hint,
    )
    existing = tracker.find_logged_run(record.get("mlflow_run_id"))
    if not tracker.enabled:
        return None
    if existing is not None and not force:
        print(f"{run_dir}: skipped, already logged as mlflow run {existing} in {tracker.uri} "
              f"(experiment {tracker.experiment_name!r}); pass --force to log it again")
        return existing
    tags = {"vizpipe.run_dir": str(run_dir.resolve()), "vizpipe.logged_later": "true"}
    tracker.start(record.get("run_name") or _fallback_run_name(run_dir, sweep), params, tags, sweep)
    tracker.log_metrics(record.get("metrics", {}))
    tracker.log_artifact(run_dir / "results.h5")
    tracker.log_artifact(run_dir / "figures", "figures")
    tracker.log_artifact(run_dir / ".hydra", ".hydra")
    # A folder without a job record is a job that never reached its end.
    tracker.end(record.get("status", "FAILED"), sweep)
    if not tracker.enabled:
        return None
    print(f"{run_dir}: mlflow run {tracker.run_id} ({record.get('status', 'FAILED')}) in {tracker.uri}")
    return tracker.run_id


def _fallback_run_name(run_dir: Path, sweep: SweepInfo | None) -> str:
    """Name the run of a folder without a job record, as the job would have, from its ``.hydra/overrides.yaml``."""
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_path.is_file():
        return run_dir.name
    overrides = [o for o in OmegaConf.load(overrides_path) if not override_key(o).startswith("hydra")]
    if sweep is not None:
        overrides = [o for o in overrides if override_key(o) in sweep.swept_keys]
    return job_run_name(_analyses_of(run_dir), overrides)


def _analyses_of(run_dir: Path) -> list[str]:
    from vizpipe.config import ANALYSIS_ORDER

    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        return []
    cfg = OmegaConf.load(config_path)
    return [name for name in ANALYSIS_ORDER if OmegaConf.select(cfg, f"analysis.{name}") is not None]


def log_main(argv: list[str] | None = None) -> None:
    """Entry point of ``vizpipe-log``: log finished run folders, or a whole multirun folder, to MLflow."""
    parser = argparse.ArgumentParser(
        prog=LOG_LATER_COMMAND,
        description="Log a finished vizpipe run folder to MLflow, for jobs whose tracking server was unreachable. "
        "A multirun folder (it holds multirun.yaml) becomes one parent run with a child run per job.",
    )
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or multirun folders")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the job's tracking.tracking_uri, "
                        "else $MLFLOW_TRACKING_URI, else sqlite:///<output_root>/mlflow.db)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: the job's tracking.experiment_name)")
    parser.add_argument("--force", action="store_true", help="log a folder again even if the experiment already "
                        "has a run of it (from an earlier vizpipe-log, or the job's own run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")

    failed = 0
    try:
        for folder in args.folders:
            if not folder.is_dir():
                raise VizpipeError(f"run folder not found: {folder}")
            multirun_yaml = folder / "multirun.yaml"
            if not multirun_yaml.is_file():
                failed += _log_job_folder(folder, args.tracking_uri, args.experiment, None, args.force) is None
                continue
            jobs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
            if not jobs:
                raise VizpipeError(f"multirun folder {folder} has no job folders (0, 1, ...)")
            for job in jobs:
                sweep = _sweep_info(folder, int(job.name), _analyses_of(job), [])
                failed += _log_job_folder(job, args.tracking_uri, args.experiment, sweep, args.force) is None
    except VizpipeError as error:
        print(f"{LOG_LATER_COMMAND}: error: {error}", file=sys.stderr)
        sys.exit(2)
    if failed:
        print(f"{LOG_LATER_COMMAND}: error: {failed} folder(s) could not be logged; see the warnings above", file=sys.stderr)
        sys.exit(1)


def unselected_analysis_override(arguments: list[str]) -> str | None:
    """Return an error message when an override sets a key of an analysis the same command deselects.

    Hydra fails on such an override with an internal AssertionError, so the
    command line is checked before Hydra composes the config.
    """
    selected = None
    for argument in arguments:
        if argument.startswith("analysis="):
            selections = group_selections("analysis", argument.split("=", 1)[1])
            if selections is None or len(selections) != 1:
                return None  # a sweep over selections (each job differs) or a value Hydra reports
            selected = selections[0]
    if selected is None:
        return None
    if any(name not in group_options("analysis") for name in selected):
        return None  # an option from the user's own config folder may fill any analysis package
    for argument in arguments:
        if argument.startswith("analysis.") and "=" in argument:
            name = argument.split(".")[1].split("=")[0]
            if name not in selected:
                return (
                    f"{argument.split('=')[0]} is set, but analysis={','.join(selected)} does not select {name}; "
                    f"add it, e.g. analysis=[{','.join([*selected, name])}], or drop the override"
                )
    return None


def main() -> None:
    message = check_overrides(sys.argv[1:]) or unselected_analysis_override(sys.argv[1:])
    if message is not None:
        print(f"vizpipe: error: {message}", file=sys.stderr)
        sys.exit(2)
    _run()


def figures_main() -> None:
    _figures()
