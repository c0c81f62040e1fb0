"""The HDF5 results file: the only module that imports h5py.

One ``results.h5`` per job. Root attributes identify what produced it; one
group per analysis holds raw tensors (never clipped) with parameters as
attributes. ``docs/hdf5-layout.md`` documents every name.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vizpipe import __version__
from vizpipe.errors import VizpipeError

SCHEMA_VERSION = 1
ANALYSIS_GROUPS = ("conv_kernels", "landscape", "hessian", "activation_maximization", "training")
_COMPRESSED_MIN_SIZE = 4096  # elements; smaller datasets are stored contiguous


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=h5py.string_dtype())
    return np.asarray(value)


def _attr_value(value: Any) -> Any:
    if value is None:
        return "None"
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype())
        return np.asarray(value)
    return value


def create_results_file(path: str | Path, attrs: Mapping[str, Any]) -> Path:
    """Create (or truncate) ``path`` and write the root attributes.

    ``schema_version``, ``vizpipe_version``, ``torch_version`` and ``created`` are
    added here; callers pass the resolved config, the weight fingerprint and
    anything else that identifies the job.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["vizpipe_version"] = __version__
        handle.attrs["torch_version"] = str(torch.__version__)
        handle.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)
    return path


def write_root_attrs(path: str | Path, attrs: Mapping[str, Any]) -> None:
    with h5py.File(path, "a") as handle:
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)


def write_group(
    path: str | Path,
    group: str,
    datasets: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``datasets`` (name -> tensor, array or list of str) and ``attrs`` under ``group``.

    ``group`` may be nested (``"activation_maximization/conv1"``); an existing
    group of that name is replaced, so a rerun of one analysis overwrites only
    its own group. A nested mapping in ``datasets`` becomes a subgroup.
    """
    with h5py.File(path, "a") as handle:
        if group in handle:
            del handle[group]
        node = handle.create_group(group)
        _write_datasets(node, datasets)
        for key, value in (attrs or {}).items():
            node.attrs[key] = _attr_value(value)


def _write_datasets(node: h5py.Group, datasets: Mapping[str, Any]) -> None:
    for name, value in datasets.items():
        if "/" in name:
            raise ValueError(f"dataset name {name!r} must not contain '/'")
        if isinstance(value, Mapping):
            _write_datasets(node.create_group(name), value)
            continue
        array = _to_numpy(value)
        options = {}
        if array.size >= _COMPRESSED_MIN_SIZE and array.dtype.kind in "fiub":
            options = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        node.create_dataset(name, data=array, **options)


class Results(dict):
    """A results file loaded into memory: ``results["landscape"]["loss"]`` is a numpy array.

    ``results.attrs`` holds the root attributes and ``results.group_attrs[group]``
    those of each (nested) group, keyed by the group's path.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.attrs: dict[str, Any] = {}
        self.group_attrs: dict[str, dict[str, Any]] = {}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OS":
        return [v.decode() if isinstance(v, bytes) else v for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value == "None":
        return None
    return value


def _read_group(node: h5py.Group, results: Results, prefix: str) -> dict:
    content = {}
    results.group_attrs[prefix] = {key: _decode(value) for key, value in node.attrs.items()}
    for name, child in node.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(child, h5py.Group):
            content[name] = _read_group(child, results, path)
        else:
            data = child[()]
            content[name] = _decode(data) if child.dtype.kind in "OS" else data
    return content


def read_results(path: str | Path) -> Results:
    """Load a results file, checking that it is a vizpipe file this version can read.

    Raises ``VizpipeError`` for a missing file, a file that is not HDF5, a file
    without vizpipe's root attributes, or one written by a newer schema.
    """
    path = Path(path)
    if not path.is_file():
        raise VizpipeError(f"results file not found: {path}")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise VizpipeError(f"cannot read {path} as HDF5 ({error}); is it a vizpipe results.h5?") from error
    with handle:
        if "schema_version" not in handle.attrs:
            raise VizpipeError(f"{path} is not a vizpipe results file: the root has no schema_version attribute")
        version = int(handle.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            raise VizpipeError(
                f"{path} uses results schema {version}, newer than this vizpipe's {SCHEMA_VERSION}; upgrade vizpipe"
            )
        results = Results(path)
        results.attrs = {key: _decode(value) for key, value in handle.attrs.items()}
        for name, child in handle.items():
            if isinstance(child, h5py.Group):
                results[name] = _read_group(child, results, name)
    return results
