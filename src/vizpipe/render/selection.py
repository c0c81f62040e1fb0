"""Job selection and labels for paper figures.

A figure spec selects jobs from a multirun folder (all of them, the job
numbers in ``select.jobs``, and those whose config matches ``select.where``)
or from an MLflow experiment (``select.filter_string``). Without a
``figure.label`` key, each job is labelled by the Hydra overrides that differ
between the selected jobs, e.g. ``model=mlp``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vizpipe.errors import VizpipeError
from vizpipe.store import read_root_attrs
from vizpipe.tracking import find_run_results, override_key, resolve_tracking_uri

# The results group that each figure kind draws.
KIND_ANALYSIS = {
    "landscapes": "landscape",
    "eigenvalues": "hessian",
    "activation_maximization": "activation_maximization",
    "kernels": "conv_kernels",
}
_ABSENT = object()


@dataclass
class SelectedJob:
    """A job that a figure spec selects."""

    source: str  # MLflow run id or results file path, as listed in <name>_sources.json
    results_path: Path
    name: str  # "job 3" or the MLflow run name: the label when no override differs between the jobs
    job_number: int | None  # the job's folder in a multirun folder; None for a run from an MLflow query
    overrides: list[str] | None  # the job's Hydra overrides (.hydra/overrides.yaml); None when unknown


def select_jobs(select: Any, download_dir: Path) -> list[SelectedJob]:
    """Return the jobs that ``figure.select`` names, in panel order."""
    if (select.runs_folder is None) == (select.experiment_name is None):
        raise VizpipeError(
            "figure.select needs exactly one of runs_folder=<multirun folder> or experiment_name=<MLflow experiment>"
        )
    if select.runs_folder is not None:
        return _select_from_folder(select)
    if select.jobs is not None or select.where:
        raise VizpipeError(
            "figure.select.jobs and figure.select.where pick jobs of a runs_folder; "
            "for an MLflow experiment narrow figure.select.filter_string instead"
        )
    return _select_from_mlflow(select, download_dir)


def _select_from_folder(select: Any) -> list[SelectedJob]:
    folder = Path(select.runs_folder).expanduser()
    if not folder.is_dir():
        raise VizpipeError(f"figure.select.runs_folder {folder} not found; pass a multirun folder")
    available = {int(p.name): p for p in folder.iterdir() if p.name.isdigit() and (p / "results.h5").is_file()}
    if not available:
        raise VizpipeError(f"figure.select.runs_folder {folder} has no job folder with a results.h5; pass a multirun folder")

    numbers = sorted(available)
    if select.jobs is not None:
        numbers = list(select.jobs)
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        if repeated:
            raise VizpipeError(f"figure.select.jobs lists job(s) {repeated} more than once; list each job once")
        missing = [n for n in numbers if n not in available]
        if missing:
            raise VizpipeError(
                f"figure.select.jobs {missing} not found in {folder}: the jobs with a results.h5 are {sorted(available)}"
            )

    where = _flat_where(select.where)
    if where:
        configs = {n: _stored_config(available[n] / "results.h5") for n in numbers}
        matching = [n for n in numbers if all(_value_matches(configs[n], key, value) for key, value in where.items())]
        if not matching:
            raise VizpipeError(
                f"figure.select.where {where} matches none of jobs {numbers} in {folder}; "
                f"their values: {_values_by_job(configs, where)}"
            )
        numbers = matching

    jobs = []
    for number in numbers[: select.max_runs]:
        folder_of_job = available[number]
        jobs.append(SelectedJob(
            str(folder_of_job / "results.h5"), folder_of_job / "results.h5", f"job {number}", number,
            _read_overrides(folder_of_job / ".hydra" / "overrides.yaml"),
        ))
    return jobs


def _select_from_mlflow(select: Any, download_dir: Path) -> list[SelectedJob]:
    uri = resolve_tracking_uri(select.tracking_uri, "outputs")
    try:
        found = find_run_results(
            uri, select.experiment_name, select.filter_string, list(select.order_by), select.max_runs, download_dir
        )
    except LookupError as error:
        raise VizpipeError(f"{error}; check figure.select.experiment_name and figure.select.tracking_uri") from error
    except Exception as error:  # noqa: BLE001 - MLflow reports a bad filter or an unreachable server in many types
        raise VizpipeError(f"MLflow search failed at {uri} ({type(error).__name__}: {error}); check figure.select") from error
    return [
        SelectedJob(run.run_id, run.results_path, run.run_name, None, _read_overrides(run.overrides_path))
        for run in found
    ]


def _flat_where(where: Any) -> dict[str, Any]:
    """Flatten ``select.where`` to dotted keys, so ``{a.b: 1}`` and ``{a: {b: 1}}`` mean the same."""
    if where is None:
        return {}
    plain = OmegaConf.to_container(where) if OmegaConf.is_config(where) else where
    if not isinstance(plain, Mapping):
        raise VizpipeError(
            f"invalid figure.select.where {plain!r}: expected a mapping of config keys to values, "
            "e.g. figure.select.where={analysis.landscape.noise_range:0.1}"
        )
    return _flatten_mapping(plain)


def _flatten_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.update({f"{key}.{inner}": v for inner, v in _flatten_mapping(value).items()})
        else:
            flat[str(key)] = value
    return flat


def _stored_config(results_path: Path) -> Any:
    """Return the resolved config that a job stored in its results.h5."""
    return OmegaConf.create(read_root_attrs(results_path).get("config_yaml", "{}"))


def _config_value(config: Any, key: str) -> Any:
    value = OmegaConf.select(config, key, default=_ABSENT)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _value_matches(config: Any, key: str, expected: Any) -> bool:
    """Compare a job's config value with a ``select.where`` value.

    Values match when equal or when their text is equal, so 0.1 matches
    ``'0.1'``; a path also matches its file name alone.
    """
    value = _config_value(config, key)
    if value is _ABSENT:
        return False
    if value == expected or str(value) == str(expected):
        return True
    return isinstance(value, str) and "/" in value and Path(value).name == str(expected)


def _values_by_job(configs: Mapping[int, Any], where: Mapping[str, Any]) -> str:
    """Describe each ``where`` key's values over the jobs, e.g. ``noise_range = 1.0 (jobs 0, 2), 0.1 (job 1)``."""
    parts = []
    for key in where:
        jobs_by_value: dict[str, list[int]] = {}
        for number, config in configs.items():
            value = _config_value(config, key)
            jobs_by_value.setdefault("not set" if value is _ABSENT else repr(value), []).append(number)
        listed = ", ".join(
            f"{value} (job{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))})"
            for value, numbers in jobs_by_value.items()
        )
        parts.append(f"{key} = {listed}")
    return "; ".join(parts)


def _read_overrides(path: Path | None) -> list[str] | None:
    if path is None or not path.is_file():
        return None
    overrides = OmegaConf.load(path)
    return [str(o) for o in overrides] if OmegaConf.is_list(overrides) else None


def override_labels(jobs: list[SelectedJob]) -> list[str]:
    """Label each job by its overrides that differ between ``jobs``, e.g. ``model=mlp``.

    Keys are shortened to their last part (``noise_range=0.1``) unless two of
    them would read the same, and paths to their file name. A job with no
    such override, or whose overrides are unknown, is labelled by its name.
    """
    parsed = [_override_values(job.overrides) if job.overrides is not None else None for job in jobs]
    known = [values for values in parsed if values is not None]
    keys: list[str] = []
    for values in known:
        keys += [key for key in values if key not in keys]
    differing = [key for key in keys if len({values.get(key, _ABSENT) for values in known}) > 1]

    short = {key: key.rsplit(".", 1)[-1] for key in differing}
    repeated = {name for name in short.values() if list(short.values()).count(name) > 1}
    short = {key: (key if name in repeated else name) for key, name in short.items()}

    labels = []
    for job, values in zip(jobs, parsed):
        parts = [] if values is None else [
            f"{short[key]}={_display_value(values[key])}" for key in differing if key in values
        ]
        labels.append(",".join(parts) or job.name)
    return labels


def _override_values(overrides: list[str]) -> dict[str, str]:
    """Map each override's key (without ``+``/``~``) to its value as typed; Hydra's own keys are left out."""
    values = {}
    for override in overrides:
        key = override_key(override)
        if key == "hydra" or key.startswith("hydra."):
            continue
        values[key] = override.partition("=")[2] if "=" in override else "(deleted)"
    return values


def _display_value(value: str) -> str:
    if "/" in value and not value.startswith(("[", "{")):
        return Path(value).name  # checkpoint paths: the file name
    return value


def check_selected_analysis(spec: Any, jobs: list[SelectedJob], has_analysis: list[bool]) -> None:
    """Reject a selection with jobs that lack the analysis that ``spec.kind`` draws, saying how to narrow it."""
    group = KIND_ANALYSIS.get(spec.kind)
    lacking = [job for job, present in zip(jobs, has_analysis) if not present]
    if group is None or not lacking:
        return
    having = [job for job, present in zip(jobs, has_analysis) if present]
    named = ", ".join(job.name if job.job_number is not None else job.source for job in lacking)
    message = f"figure {spec.name!r} needs the {group} analysis, but these selected jobs have none: {named}; "
    if not having:
        raise VizpipeError(message + "select jobs that ran it")
    if lacking[0].job_number is not None:
        numbers = ",".join(str(job.job_number) for job in having)
        raise VizpipeError(message + f"narrow figure.select to the jobs that ran it: figure.select.jobs=[{numbers}]")
    run_ids = ",".join(f"'{job.source}'" for job in having)
    raise VizpipeError(
        message + "narrow figure.select.filter_string to the runs that ran it, "
        f"e.g. figure.select.filter_string=\"attributes.run_id IN ({run_ids})\""
    )
