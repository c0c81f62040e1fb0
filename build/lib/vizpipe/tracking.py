"""MLflow tracking: the only module that imports mlflow.

One MLflow run per job, driven through ``MlflowClient`` with an explicit run id,
so no global "active run" is left behind when a job fails. Every call is
guarded: a tracking failure logs a warning and disables tracking for the rest
of the job, and never costs a result (results.h5 is written before anything is
logged).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# MLflow 3 accepts parameter values of up to 6,000 characters and at most 100
# parameters per log_batch call.
MAX_PARAM_LENGTH = 6000
PARAM_BATCH_SIZE = 100
METRIC_BATCH_SIZE = 1000

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


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to ``{"a.b.c": "value"}``, shortening over-long values.

    A value longer than ``MAX_PARAM_LENGTH`` keeps its start and ends with
    ``...sha256:<first 12 hex digits>`` of the full value; the full config is
    logged as an artifact anyway.
    """
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_LENGTH:
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            suffix = f"...sha256:{digest}"
            text = text[: MAX_PARAM_LENGTH - len(suffix)] + suffix
        flat[name] = text
    return flat


class Tracker:
    """One MLflow run. All methods are no-ops once tracking is disabled or has failed."""

    def __init__(self, enabled: bool, tracking_uri: str | None, experiment_name: str, output_root: str | Path):
        self.enabled = enabled
        self.uri = resolve_tracking_uri(tracking_uri, output_root) if enabled else None
        self.experiment_name = experiment_name
        self.output_root = Path(output_root).expanduser().resolve()
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client = None

    def _guard(self, action: str, function, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any tracking failure must not end the job
            log.warning(
                "MLflow %s failed at %s (%s: %s); tracking is off for the rest of this job, "
                "results.h5 and the figures are still written to the run folder",
                action, self.uri, type(error).__name__, error,
            )
            self.enabled = False
            return None

    def start(self, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        self._guard("start_run", self._start, run_name, params, tags or {})

    def _start(self, run_name, params, tags) -> None:
        import mlflow
        from mlflow.entities import Param

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
                artifact_location = (self.output_root / "mlartifacts").as_uri()
            self.experiment_id = self._client.create_experiment(self.experiment_name, artifact_location)
        else:
            self.experiment_id = experiment.experiment_id
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags))
        self.run_id = run.info.run_id
        items = [Param(key, value) for key, value in flatten(params).items()]
        for start in range(0, len(items), PARAM_BATCH_SIZE):
            self._client.log_batch(self.run_id, params=items[start : start + PARAM_BATCH_SIZE])
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment_name, self.uri)

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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is None:
            return
        path = Path(path)
        if path.is_dir():
            self._guard("log_artifacts", self._client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            self._guard("log_artifact", self._client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.run_id is None:
            return
        self._guard("set_terminated", self._client.set_terminated, self.run_id, status)
