"""MLflow tracking: the only module that imports mlflow.

One MLflow run per job, driven through ``MlflowClient`` with an explicit run id,
so no global "active run" is left behind when a job fails. The jobs of a Hydra
multirun are child runs of one parent run per sweep. The first job that takes
the lock on the sweep folder creates the parent and stores its id there, so the
other jobs find it, also from other processes or hosts.

Every call is guarded: a tracking failure logs a warning and disables tracking
for the rest of the job, and never costs a result (results.h5 is written before
anything is logged). ``vizpipe-log`` logs a finished run folder later.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vizpipe.config import ANALYSIS_ORDER

log = logging.getLogger(__name__)

# MLflow 2.8 and later accept parameter values of up to 6,000 characters, MLflow
# 1.28 to 2.7 accept 500. A log_batch call takes at most 100 parameters.
MAX_PARAM_LENGTH = 6000
PARAM_BATCH_SIZE = 100
METRIC_BATCH_SIZE = 1000
MAX_RUN_NAME_LENGTH = 250
MAX_TAG_LENGTH = 5000

# A job's run becomes a child of this run when the variable is set, instead of
# the parent that the sweep folder names.
PARENT_RUN_ENV = "VIZPIPE_MLFLOW_PARENT_RUN_ID"
SWEEP_STATE_FILE = "mlflow_sweep.json"
SWEEP_LOCK_FILE = ".mlflow_sweep.lock"
LOG_LATER_COMMAND = "vizpipe-log"

# Fail fast when a tracking server is down instead of MLflow's default retries
# of several minutes; users can still override these variables.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def resolve_tracking_uri(tracking_uri: str | None, output_root: str | Path) -> str:
    """Return the tracking URI: the config's, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    store at ``<output_root>/mlflow.db`` with an absolute path."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(output_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def shorten(text: str, limit: int = MAX_PARAM_LENGTH) -> str:
    """Cut ``text`` to ``limit`` characters, ending it with ``...sha256:<12 hex digits>`` of the full text."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    suffix = f"...sha256:{digest}"
    return text[: limit - len(suffix)] + suffix


def flatten(config: Mapping[str, Any], prefix: str = "", limit: int = MAX_PARAM_LENGTH) -> dict[str, str]:
    """Flatten nested mappings to ``{"a.b.c": "value"}``, shortening over-long values.

    A value longer than ``limit`` keeps its start and ends with
    ``...sha256:<first 12 hex digits>`` of the full value; the full config is
    logged as an artifact anyway.
    """
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}.", limit))
            continue
        flat[name] = shorten(str(value), limit)
    return flat


# Servers reject a too-long value with "... exceeded length limit of 500"
# (MLflow 1.28 to 2.7) or "... exceeds the maximum length of 6000 characters" (later).
_LENGTH_LIMIT_MESSAGE = re.compile(r"(?:length limit of|maximum length of) (\d+)")


def server_param_limit(error: Exception) -> int | None:
    """Return the parameter length limit named in a server's rejection, or None if it names none."""
    match = _LENGTH_LIMIT_MESSAGE.search(str(error))
    return int(match.group(1)) if match else None


def override_key(override: str) -> str:
    """Return the config key or group of a Hydra override, without its ``+``, ``++`` or ``~`` prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def job_run_name(analyses: list[str], overrides: list[str]) -> str:
    """Build a run name from the selected analyses and the job's overrides.

    ``analysis=[...]`` overrides are left out because the analyses lead the name,
    and ``analysis.<name>.`` prefixes are dropped, so a landscape sweep point
    reads ``landscape noise_range=0.1``.
    """
    parts = []
    for override in overrides:
        key = override_key(override)
        if key in ("analysis", "hydra") or key.startswith("hydra."):
            continue
        for name in analyses:
            override = override.replace(f"analysis.{name}.", "")
        parts.append(override)
    name = "+".join(analyses) or "no analysis"
    if parts:
        name += " " + ",".join(parts)
    return name[:MAX_RUN_NAME_LENGTH]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block.

    NOTE: flock is atomic between processes on one host. Cluster file systems
    differ (NFSv4, Lustre and GPFS mounts usually support it, tested here only
    on a local disk). Where locks are unsupported this raises OSError, which
    the caller turns into a tracking warning.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomically(path: Path, content: Mapping[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
    os.replace(handle.name, path)


@dataclass
class SweepInfo:
    """A multirun job's place in its sweep: the sweep folder, the job number and the sweep's overrides."""

    sweep_dir: Path
    job_number: int
    # The sweep's overrides as typed: the sweeper's params (``hydra.sweeper.params``,
    # also from an experiment preset), then the command line, e.g. ``seed=range(0,3)``.
    overrides: list[str]
    swept_keys: set[str]  # keys whose value varies across the sweep's jobs
    analyses: list[str]  # the analyses this job runs

    def parent_run_name(self, analyses: list[str]) -> str:
        """Name the parent run by ``analyses``, the union over the sweep's jobs, and the swept overrides."""
        swept = [override for override in self.overrides if override_key(override) in self.swept_keys]
        return "sweep " + job_run_name(analyses, swept)


def analysis_union(*selections: list[str]) -> list[str]:
    """Return the analyses named in any of ``selections``, in the order jobs run them."""
    names = {name for selection in selections for name in selection}
    known = [name for name in ANALYSIS_ORDER if name in names]
    return known + sorted(names - set(known))


class Tracker:
    """One MLflow run. All methods are no-ops once tracking is disabled or has failed."""

    def __init__(
        self,
        enabled: bool,
        tracking_uri: str | None,
        experiment_name: str,
        output_root: str | Path,
        run_dir: str | Path | None = None,
        max_param_length: int = MAX_PARAM_LENGTH,
        failure_hint: str | None = None,
    ):
        """``failure_hint`` ends the warning of a failed MLflow call. The default states that
        the job goes on and names the ``vizpipe-log`` command that logs ``run_dir`` later."""
        self.enabled = enabled
        self.max_param_length = max_param_length
        self.uri = resolve_tracking_uri(tracking_uri, output_root) if enabled else None
        self.experiment_name = experiment_name
        self.output_root = Path(output_root).expanduser().resolve()
        self.run_dir = Path(run_dir).resolve() if run_dir is not None else None
        if failure_hint is None:
            failure_hint = (
                "tracking is off for the rest of this job, results.h5 and the figures are still written to the run folder"
            )
            if self.run_dir is not None:
                failure_hint += f"; log it later with: {LOG_LATER_COMMAND} {self.run_dir}"
        self.failure_hint = failure_hint
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None

    def _guard(self, action: str, function, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking failure must not end the job
            log.warning("MLflow %s failed at %s (%s: %s); %s", action, self.uri, type(error).__name__, error, self.failure_hint)
            self.enabled = False
            return None

    # Run life cycle

    def start(
        self,
        run_name: str | None,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        sweep: SweepInfo | None = None,
    ) -> None:
        """Create the run and log ``params`` flattened; in a sweep, make it a child of the sweep's parent run."""
        self._guard("start_run", self._start, run_name, params, dict(tags or {}), sweep)

    def _connect(self) -> None:
        if not self.uri.startswith("sqlite:///"):
            self._open_experiment()
            return
        # The first access to a new SQLite store creates its tables; two jobs of
        # a parallel sweep doing that at once fail ("duplicate column name").
        with _locked(Path(self.uri.removeprefix("sqlite:///") + ".lock")):
            self._open_experiment()

    def _open_experiment(self) -> None:
        import mlflow

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            self.experiment_id = experiment.experiment_id
            return
        artifact_location = None
        if self.uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
            artifact_location = (self.output_root / "mlartifacts").as_uri()
        try:
            self.experiment_id = self._client.create_experiment(self.experiment_name, artifact_location)
        except mlflow.exceptions.MlflowException:
            # Another job of the sweep created it in the meantime (on a server, which the lock does not cover).
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                raise
            self.experiment_id = experiment.experiment_id

    def _start(self, run_name, params, tags, sweep) -> None:
        self._connect()
        if os.environ.get(PARENT_RUN_ENV):
            self.parent_run_id = os.environ[PARENT_RUN_ENV]
        elif sweep is not None:
            self.parent_run_id = self._sweep_parent(sweep)
        if self.parent_run_id is not None:
            tags["mlflow.parentRunId"] = self.parent_run_id
        if sweep is not None:
            tags["vizpipe.sweep_dir"] = str(sweep.sweep_dir.resolve())
            tags["vizpipe.job_number"] = str(sweep.job_number)
        self.run_id = self._create_run(run_name, tags)
        self._log_params(self.run_id, params)
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment_name, self.uri)

    def _create_run(self, run_name: str | None, tags: Mapping[str, str]) -> str:
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log ``params`` in batches; shorten them again and retry once if the server has a lower length limit."""
        from mlflow.exceptions import MlflowException

        try:
            self._log_param_batches(run_id, flatten(params, limit=self.max_param_length))
            return
        except MlflowException as error:
            limit = server_param_limit(error)
            if limit is None or limit >= self.max_param_length:
                raise
            log.warning(
                "The tracking server at %s accepts parameter values of at most %d characters; "
                "shortening them (set tracking.max_param_length=%d to skip this retry)",
                self.uri, limit, limit,
            )
            self.max_param_length = limit
        # Params of the batches logged before the rejection are logged again with
        # the same values, which MLflow accepts.
        self._log_param_batches(run_id, flatten(params, limit=limit))

    def _log_param_batches(self, run_id: str, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flat.items()]
        for start in range(0, len(items), PARAM_BATCH_SIZE):
            self._client.log_batch(run_id, params=items[start : start + PARAM_BATCH_SIZE])

    def _sweep_parent(self, sweep: SweepInfo) -> str:
        """Return the sweep's parent run id, creating the parent run if no job has yet.

        The lock makes the read-create-write step atomic across the sweep's jobs,
        so exactly one parent exists per sweep folder, tracking URI and experiment.
        """
        state_path = sweep.sweep_dir / SWEEP_STATE_FILE
        with _locked(sweep.sweep_dir / SWEEP_LOCK_FILE):
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            if state.get("tracking_uri") == self.uri and state.get("experiment_id") == self.experiment_id:
                # The first job need not run all of the sweep's analyses (a sweep over
                # analysis selections or presets), so each job adds its own analyses
                # and renames the parent when the union grows.
                known = state.get("analyses", [])
                analyses = analysis_union(known, sweep.analyses)
                if analyses != known:
                    name = shorten(sweep.parent_run_name(analyses), MAX_RUN_NAME_LENGTH)
                    self._client.update_run(state["parent_run_id"], name=name)
                    state["analyses"] = analyses
                self._mark_parent(state, sweep.job_number, "RUNNING")
                _write_json_atomically(state_path, state)
                return state["parent_run_id"]

            analyses = analysis_union(sweep.analyses)
            name = shorten(sweep.parent_run_name(analyses), MAX_RUN_NAME_LENGTH)
            tags = {"vizpipe.sweep_dir": str(sweep.sweep_dir.resolve()), "vizpipe.role": "sweep"}
            parent_id = self._create_run(name, tags)
            swept = {}
            for override in sweep.overrides:
                swept[f"sweep.{override_key(override)}"] = override.partition("=")[2]
            self._log_params(parent_id, swept)
            multirun_yaml = sweep.sweep_dir / "multirun.yaml"
            if multirun_yaml.is_file():
                self._client.log_artifact(parent_id, str(multirun_yaml))
            state = {
                "tracking_uri": self.uri, "experiment_id": self.experiment_id, "parent_run_id": parent_id,
                "analyses": analyses, "jobs": {},
            }
            self._mark_parent(state, sweep.job_number, "RUNNING")
            _write_json_atomically(state_path, state)
            log.info("MLflow parent run %s for sweep %s", parent_id, sweep.sweep_dir)
            return parent_id

    def _mark_parent(self, state: dict, job_number: int, status: str) -> None:
        """Record a job's status in the sweep state and set the parent's status from all of them.

        The parent is FAILED once any job failed or was killed, RUNNING while a
        started job has not ended, and FINISHED when every started job finished.
        """
        state["jobs"][str(job_number)] = status
        statuses = set(state["jobs"].values())
        if statuses & {"FAILED", "KILLED"}:
            self._client.set_terminated(state["parent_run_id"], "FAILED")
        elif "RUNNING" in statuses:
            self._client.update_run(state["parent_run_id"], status="RUNNING")
        else:
            self._client.set_terminated(state["parent_run_id"], "FINISHED")

    def record_error(self, error: BaseException) -> None:
        """Store the error as the ``vizpipe.error`` tag and its traceback as ``error.txt``."""
        if self.run_id is None:
            return
        summary = shorten(f"{type(error).__name__}: {error}", MAX_TAG_LENGTH)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self._guard("set_tag", self._client.set_tag, self.run_id, "vizpipe.error", summary)
        self._guard("log_text", self._client.log_text, self.run_id, text, "error.txt")

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.run_id is None:
            return
        self._guard("log_metrics", self._log_metrics, metrics, step)

    def _log_metrics(self, metrics, step) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
        for start in range(0, len(items), METRIC_BATCH_SIZE):
            self._client.log_batch(self.run_id, metrics=items[start : start + METRIC_BATCH_SIZE])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.run_id is None:
            return
        for key, value in tags.items():
            self._guard("set_tag", self._client.set_tag, self.run_id, key, shorten(str(value), MAX_TAG_LENGTH))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self._guard("log_artifacts", self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def end_stale_runs(self) -> list[str]:
        """End as KILLED the earlier runs of this run folder that are still RUNNING; return their ids.

        A job killed by SIGKILL or a power cut cannot end its run. The caller
        holds the run folder's lock, so no other job of this folder is running
        and a RUNNING run of it is such a leftover.
        """
        if self.run_id is None or self.run_dir is None or not self.enabled:
            return []
        try:
            # The folder is compared here, not in the filter string, because
            # MLflow's filter strings have no escape for a quote inside a value.
            running = self._client.search_runs([self.experiment_id], filter_string="attributes.status = 'RUNNING'")
            ended = []
            for run in running:
                if run.info.run_id == self.run_id or run.data.tags.get("vizpipe.run_dir") != str(self.run_dir):
                    continue
                self._client.set_tag(run.info.run_id, "vizpipe.error", "the job ended without closing its run (killed)")
                self._client.set_terminated(run.info.run_id, "KILLED")
                ended.append(run.info.run_id)
        except Exception as error:  # noqa: BLE001 - a failed cleanup must not end tracking of this job
            log.warning("MLflow: could not check for runs left RUNNING in %s (%s: %s)", self.run_dir, type(error).__name__, error)
            return []
        if ended:
            log.warning("MLflow: ended %d run(s) of %s left RUNNING by a killed job as KILLED: %s",
                        len(ended), self.run_dir, ", ".join(ended))
        return ended

    def find_logged_run(self, job_run_id: str | None) -> str | None:
        """Return the id of a run of ``run_dir`` in this experiment that already contains its results, or None.

        Such a run is an earlier ``vizpipe-log`` of the folder, or the job's own
        run ``job_run_id``, which a job records only when its tracking never
        failed. When the store cannot be reached this returns None and turns
        tracking off.
        """
        if not self.enabled or self.run_dir is None:
            return None
        self._guard("connect", self._connect)
        if not self.enabled:
            return None
        return self._guard("search_runs", self._find_logged_run, job_run_id)

    def _find_logged_run(self, job_run_id: str | None) -> str | None:
        from mlflow.exceptions import MlflowException

        if job_run_id:
            try:
                run = self._client.get_run(job_run_id)
            except MlflowException:
                run = None  # the job logged to another store
            if (
                run is not None
                and run.info.experiment_id == self.experiment_id
                and run.data.tags.get("vizpipe.run_dir") == str(self.run_dir)
            ):
                return job_run_id
        # The folder is compared here, not in the filter string, because MLflow's
        # filter strings have no escape for a quote inside a value.
        token = None
        while True:
            page = self._client.search_runs(
                [self.experiment_id], filter_string="tags.`vizpipe.logged_later` = 'true'", max_results=1000,
                page_token=token,
            )
            for run in page:
                if run.data.tags.get("vizpipe.run_dir") == str(self.run_dir):
                    return run.info.run_id
            token = page.token
            if not token:
                return None

    def log_image(self, path: str | Path, key: str, step: int = 0) -> None:
        """Log the image file ``path`` under ``key`` with MLflow's image API, so the UI shows it in its image view.

        MLflow stores it as ``images/<key with / as ~>+step+...png`` plus a
        compressed copy. Characters that an image key cannot contain become ``_``.
        """
        if self.run_id is None or not Path(path).is_file():
            return
        self._guard("log_image", self._log_image, Path(path), re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key), step)

    def _log_image(self, path: Path, key: str, step: int) -> None:
        from PIL import Image

        with Image.open(path) as image:
            self._client.log_image(self.run_id, image.convert("RGB"), key=key, step=step, synchronous=True)

    def end(self, status: str = "FINISHED", sweep: SweepInfo | None = None) -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``, and update the sweep's parent run."""
        if self.run_id is None:
            return
        self._guard("set_terminated", self._client.set_terminated, self.run_id, status)
        if sweep is not None and self.parent_run_id is not None and not os.environ.get(PARENT_RUN_ENV):
            self._guard("update the sweep's parent run", self._end_sweep_job, sweep, status)

    def _end_sweep_job(self, sweep: SweepInfo, status: str) -> None:
        state_path = sweep.sweep_dir / SWEEP_STATE_FILE
        with _locked(sweep.sweep_dir / SWEEP_LOCK_FILE):
            state = json.loads(state_path.read_text())
            if state.get("parent_run_id") != self.parent_run_id:
                return
            self._mark_parent(state, sweep.job_number, status)
            _write_json_atomically(state_path, state)


@dataclass
class RunResults:
    """A finished MLflow run and where its results.h5 is on this machine."""

    run_id: str
    run_name: str
    results_path: Path
    overrides_path: Path | None  # the job's .hydra/overrides.yaml, None when the run has none


def find_run_results(
    tracking_uri: str,
    experiment_name: str,
    filter_string: str,
    order_by: list[str],
    max_runs: int,
    download_dir: Path,
) -> list[RunResults]:
    """Search an experiment for runs with a results.h5, in ``order_by`` order.

    A run's results.h5 is read from its run folder (the ``vizpipe.run_dir``
    tag) when that folder exists here, else downloaded from its artifacts into
    ``download_dir/<run id>/``. Runs without one (failed jobs, sweep parents,
    figures runs) are skipped.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"MLflow experiment {experiment_name!r} not found at {tracking_uri}")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=filter_string, order_by=list(order_by), max_results=max(max_runs * 4, 100)
    )
    found = []
    for run in runs:
        if len(found) == max_runs:
            break
        run_dir = Path(run.data.tags.get("vizpipe.run_dir", "/nonexistent"))
        local = run_dir / "results.h5"
        if local.is_file():
            overrides = run_dir / ".hydra" / "overrides.yaml"
            found.append(RunResults(run.info.run_id, run.info.run_name, local, overrides if overrides.is_file() else None))
            continue
        if "results.h5" not in {item.path for item in client.list_artifacts(run.info.run_id)}:
            continue
        target = download_dir / run.info.run_id
        target.mkdir(parents=True, exist_ok=True)
        path = client.download_artifacts(run.info.run_id, "results.h5", str(target))
        overrides = None
        if ".hydra/overrides.yaml" in {item.path for item in client.list_artifacts(run.info.run_id, ".hydra")}:
            overrides = Path(client.download_artifacts(run.info.run_id, ".hydra/overrides.yaml", str(target)))
        found.append(RunResults(run.info.run_id, run.info.run_name, Path(path), overrides))
    return found
