"""The HDF5 results file: the only module that imports h5py.

One ``results.h5`` per job. Root attributes identify what produced it, and
one group per analysis contains raw tensors (never clipped) with parameters
as attributes. ``docs/hdf5-layout.md`` documents every name.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import gc
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from vizpipe import __version__
from vizpipe.errors import VizpipeError

SCHEMA_VERSION = 1
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
    """Create (or replace) ``path`` and write the root attributes.

    ``schema_version``, ``vizpipe_version``, ``torch_version`` and ``created`` are
    added here; callers pass the resolved config, the weight fingerprint and
    anything else that identifies the job.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def fill(handle: h5py.File) -> None:
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["vizpipe_version"] = __version__
        handle.attrs["torch_version"] = str(torch.__version__)
        handle.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)

    _update_file(path, fill, new=True, added_bytes=_size_estimate(attrs))
    return path


def _is_lock_error(error: OSError) -> bool:
    return "unable to lock file" in str(error) or getattr(error, "errno", None) == errno.EAGAIN


def _open_for_writing(path: str | Path, attempts: int = 20) -> h5py.File:
    """Open ``path`` for appending; retry for a few seconds while a reader (``vizpipe-figures``, say) holds the lock."""
    for attempt in range(attempts):
        try:
            return h5py.File(path, "a", libver="latest")
        except OSError as error:
            if not _is_lock_error(error) or attempt == attempts - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def write_root_attrs(path: str | Path, attrs: Mapping[str, Any]) -> None:
    def fill(handle: h5py.File) -> None:
        for key, value in attrs.items():
            handle.attrs[key] = _attr_value(value)

    _update_file(Path(path), fill, added_bytes=_size_estimate(attrs))


def write_group_attrs(path: str | Path, group: str, attrs: Mapping[str, Any]) -> None:
    """Set attributes on ``group``, creating the group if it does not exist."""

    def fill(handle: h5py.File) -> None:
        node = handle.require_group(group)
        for key, value in attrs.items():
            node.attrs[key] = _attr_value(value)

    _update_file(Path(path), fill, added_bytes=_size_estimate(attrs))


def write_group(
    path: str | Path,
    group: str,
    datasets: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write ``datasets`` (name -> tensor, array or list of str) and ``attrs`` under ``group``.

    ``group`` may be nested (``"activation_maximization/conv1"``); an existing
    group of that name is replaced, so a rerun of one analysis overwrites only
    its own group. A nested mapping in ``datasets`` becomes a subgroup. Names
    must not contain '/' (``ValueError``); use a nested mapping instead.
    """
    arrays = _to_arrays(datasets)

    def fill(handle: h5py.File) -> None:
        if group in handle:
            del handle[group]
        node = handle.create_group(group)
        _write_datasets(node, arrays)
        for key, value in (attrs or {}).items():
            node.attrs[key] = _attr_value(value)

    _update_file(Path(path), fill, added_bytes=_size_estimate(arrays) + _size_estimate(attrs or {}))


def _to_arrays(datasets: Mapping[str, Any]) -> dict[str, Any]:
    """Convert every value to a numpy array (nested mappings stay mappings) and check the names."""
    arrays = {}
    for name, value in datasets.items():
        if "/" in name or name in ("", ".", ".."):
            raise ValueError(f"dataset name {name!r} is invalid: it must be non-empty and must not contain '/'")
        arrays[name] = _to_arrays(value) if isinstance(value, Mapping) else _to_numpy(value)
    return arrays


# Bytes of HDF5 metadata counted per group, dataset or attribute in the space
# check: object headers take a few hundred bytes, a chunk index a few kB.
_OBJECT_OVERHEAD = 4096
# Bytes counted on top of every update (free-space lists, heap growth).
_UPDATE_OVERHEAD = 65536


def _size_estimate(values: Mapping[str, Any]) -> int:
    """Return an upper estimate of the bytes that writing ``values`` adds to a file."""
    total = 0
    for value in values.values():
        total += _OBJECT_OVERHEAD
        if isinstance(value, Mapping):
            total += _size_estimate(value)
            continue
        array = _to_numpy(value) if not isinstance(value, str) else np.asarray(value)
        if array.dtype.kind == "O":
            total += sum(len(str(item).encode()) + 16 for item in array.reshape(-1).tolist())
        else:
            # gzip can make incompressible data slightly larger.
            total += int(array.nbytes * 1.01)
    return total


# errno values of a full disk, a file-size limit (RLIMIT_FSIZE) and a full quota.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _update_file(path: Path, fill: Callable[[h5py.File], None], added_bytes: int, new: bool = False) -> None:
    """Run ``fill`` on a copy of ``path`` (a new file when ``new``), then move the copy over ``path``.

    ``path`` changes only when every write succeeded, so a full disk or a
    process killed mid-write leaves the previous content readable. Before
    anything is written, the space for the copy plus ``added_bytes`` is checked
    against the free disk space and the file-size limit. A failed write raises
    ``OSError`` naming ``path``, with ``errno`` set when the system reports one.
    """
    # NOTE: each update reads and writes the whole file once more. For results
    # files of hundreds of MB (ResNet-50 landscape directions) that likely costs
    # seconds per write (an estimate, not measured).
    temporary = path.with_name(path.name + ".writing")
    current = 0 if new else path.stat().st_size
    _check_space(path, current, current + added_bytes + _UPDATE_OVERHEAD)
    try:
        if not new:
            shutil.copyfile(path, temporary)
        failure = _fill_and_close(temporary, "w" if new else "a", fill, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _write_error(error, path) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if failure is not None:
        temporary.unlink(missing_ok=True)
        raise failure
    os.replace(temporary, path)


def _check_space(path: Path, current: int, needed: int) -> None:
    """Raise OSError (EFBIG or ENOSPC) when a copy of ``path`` grown to ``needed`` bytes would not fit.

    HDF5 2.0 can crash the process when it closes a file after a failed
    write, so a write that cannot fit is stopped here instead.
    """
    # NOTE: the check races with other processes that fill the same disk, and
    # ``needed`` is an estimate. A write that fails anyway takes the crash-prone path.
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and needed > limit:
        message = f"{os.strerror(errno.EFBIG)} (about {_megabytes(needed)} needed, the file-size limit is {_megabytes(limit)})"
        raise OSError(errno.EFBIG, message, str(path))
    usage = shutil.disk_usage(path.parent)
    # The copy is written next to the file, so the disk needs the whole new size.
    if needed > usage.free:
        message = f"{os.strerror(errno.ENOSPC)} (about {_megabytes(needed)} needed, {_megabytes(usage.free)} free)"
        raise OSError(errno.ENOSPC, message, str(path))


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"


def _fill_and_close(temporary: Path, mode: str, fill: Callable[[h5py.File], None], path: Path) -> OSError | None:
    """Open ``temporary``, run ``fill`` and close it; return the write error (naming ``path``), or None."""
    handle = h5py.File(temporary, mode, libver="latest")
    try:
        fill(handle)
    except (OSError, RuntimeError) as error:
        # h5py raises these when a write fails. Only the message is kept: the
        # traceback keeps the failed datasets open, and with HDF5 2.0 closing a
        # file after a failed write while its objects are open crashes the process.
        failure = _write_error(error, path)
    except BaseException:
        handle.close()
        raise
    else:
        handle.close()
        return None
    gc.collect()
    try:
        handle.close()
    except (OSError, RuntimeError):
        pass  # the copy is deleted; the error that matters is ``failure``
    return failure


def _write_error(error: BaseException, path: Path) -> OSError:
    """Return an OSError naming ``path`` with the errno that ``error`` carries (h5py puts it in the message)."""
    code = getattr(error, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code:
        return OSError(code, os.strerror(code), str(path))
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(f"writing {path} failed: {first_line}")


def _write_datasets(node: h5py.Group, datasets: Mapping[str, Any]) -> None:
    for name, value in datasets.items():
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

    ``results.attrs`` contains the root attributes and ``results.group_attrs[group]``
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


def _open_for_reading(path: Path, attempts: int = 20) -> h5py.File:
    """Open ``path`` read-only; retry for a few seconds while a writer briefly holds the lock."""
    for attempt in range(attempts):
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError as error:
            if not _is_lock_error(error) or attempt == attempts - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def read_group_attrs(path: str | Path, group: str) -> dict[str, Any] | None:
    """Return the attributes of ``group``, or None if the file or the group does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with _open_for_reading(path) as handle:
        if group not in handle:
            return None
        return {key: _decode(value) for key, value in handle[group].attrs.items()}


def recover_after_crash(path: str | Path) -> bool:
    """Make a results file writable again after its writer died in SWMR mode; return True if it was needed.

    A process killed while writing in SWMR mode leaves a flag in the file's
    superblock that stops any later writer (HDF5 ships ``h5clear`` for this).
    Readers are not blocked, so the content is copied into a fresh file that
    replaces the old one atomically; nothing that was flushed is lost.
    """
    path = Path(path)
    try:
        with _open_for_writing(path):
            return False
    except OSError as error:
        if "already open for write" not in str(error):
            raise
    temporary = path.with_name(path.name + ".recovered")
    with _open_for_reading(path) as source, h5py.File(temporary, "w", libver="latest") as target:
        for key, value in source.attrs.items():
            target.attrs[key] = value
        for name in source:
            source.copy(source[name], target, name=name)
    os.replace(temporary, path)
    return True


def read_root_attrs(path: str | Path) -> dict[str, Any]:
    with _open_for_reading(Path(path)) as handle:
        return {key: _decode(value) for key, value in handle.attrs.items()}


class PointWriter:
    """Write grid points into existing datasets of ``group`` as they finish, in SWMR mode.

    While the writer is open, readers can open the file with ``swmr=True`` (as
    ``read_results`` does) and see every point flushed so far. The datasets
    ``loss``, ``accuracy`` and ``done`` must exist in ``group`` beforehand. Data
    are flushed at most every ``flush_every`` seconds and on exit.

    The file is opened at the first ``write``, not on entry. A process forked
    while an HDF5 file is open (torch.compile's worker pool, say) writes its
    stale copy back when it exits, so nothing may be open while the model compiles.
    """

    def __init__(self, path: str | Path, group: str, flush_every: float = 2.0):
        self.path = Path(path)
        self.group = group
        self.flush_every = flush_every
        self._handle: h5py.File | None = None
        self._last_flush = 0.0

    def __enter__(self) -> PointWriter:
        return self

    def _open(self) -> None:
        self._handle = _open_for_writing(self.path)
        node = self._handle[self.group]
        self._loss, self._accuracy, self._done = node["loss"], node["accuracy"], node["done"]
        self._handle.swmr_mode = True
        self._last_flush = time.monotonic()

    def write(self, index: tuple[int, ...], loss: float, accuracy: float) -> None:
        if self._handle is None:
            self._open()
        self._loss[index] = loss
        self._accuracy[index] = accuracy
        self._done[index] = True
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._handle is None:
            return
        for dataset in (self._loss, self._accuracy, self._done):
            dataset.flush()
        self._last_flush = time.monotonic()

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            try:
                self.flush()
            finally:
                self._handle.close()
                self._handle = None


class FileLock:
    """An exclusive lock on ``<results file>.lock`` for the duration of a job.

    A second job that points at the same run folder gets a ``VizpipeError``
    instead of writing into the same results file. The kernel drops the lock
    when the process dies, so a killed job never leaves a stale lock behind.
    """

    def __init__(self, results_path: str | Path):
        self.path = Path(str(results_path) + ".lock")
        self._descriptor: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            os.close(descriptor)
            raise VizpipeError(
                f"another vizpipe job is writing {self.path.parent}; wait for it to finish or use another run folder"
            ) from error
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._descriptor = descriptor
        return self

    def __exit__(self, *exc_info) -> None:
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None


def read_results(path: str | Path) -> Results:
    """Load a results file, checking that it is a vizpipe file this version can read.

    Raises ``VizpipeError`` for a missing file, a file that is not HDF5, a file
    without vizpipe's root attributes, or one written by a newer schema.
    """
    path = Path(path)
    if not path.is_file():
        raise VizpipeError(f"results file not found: {path}")
    try:
        handle = _open_for_reading(path)
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
