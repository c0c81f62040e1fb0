"""CIFAR-10 and CIFAR-100 from the standard "python version" batch files on local disk.

The batch files are pickles. They are read by a restricted unpickler that
admits only numpy arrays, dtypes, lists, dicts, numbers, strings and bytes, so a
tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from vizpipe.data.base import (
    ImageDataset,
    check_image_shape,
    check_num_classes,
    check_stats,
    resize_and_normalize,
)
from vizpipe.errors import VizpipeError

# (module, name) pairs that a CIFAR pickle may reference. Arrays pickled by
# numpy 1.x name numpy.core, numpy 2.x names numpy._core.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
CIFAR100_MEAN = [0.5071, 0.4865, 0.4409]
CIFAR100_STD = [0.2673, 0.2564, 0.2762]


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"global '{module}.{name}' is not allowed in a dataset file")
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def load_cifar_batch(path: str | Path) -> dict:
    """Read one CIFAR batch file through the restricted unpickler.

    Returns the batch dict with ``str`` keys (``data``, ``labels`` or
    ``fine_labels``, ...). Raises ``VizpipeError`` when the file is missing,
    truncated, or references anything but plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise VizpipeError(f"CIFAR batch file not found: {path}")
    try:
        with path.open("rb") as handle:
            batch = _RestrictedUnpickler(io.BufferedReader(handle), encoding="bytes").load()
    except _ForbiddenGlobal as error:
        raise VizpipeError(f"rejected CIFAR batch file {path}: {error}; use the original dataset files") from error
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise VizpipeError(f"corrupt CIFAR batch file {path} ({error}); download the dataset again") from error
    if not isinstance(batch, dict):
        raise VizpipeError(f"corrupt CIFAR batch file {path}: expected a dict, found {type(batch).__name__}")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_cifar_batch(path)
    if "data" not in batch or label_key not in batch:
        raise VizpipeError(
            f"corrupt CIFAR batch file {path}: keys {sorted(batch)} lack 'data' or {label_key!r}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise VizpipeError(
            f"corrupt CIFAR batch file {path}: data has shape {data.shape} for {len(labels)} labels, "
            "expected [N, 3072]"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _find_folder(data_path: str | None, subfolder: str, required: list[str], dataset: str) -> Path:
    if not data_path:
        raise VizpipeError(
            f"dataset.data_path is not set; point it to the folder with the {dataset} python-version "
            f"files ({subfolder}/)"
        )
    root = Path(data_path).expanduser()
    if not root.is_dir():
        raise VizpipeError(f"{dataset} folder not found: {root}; set dataset.data_path to the folder with {subfolder}/")
    folder = root / subfolder if (root / subfolder).is_dir() else root
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise VizpipeError(
            f"{dataset} folder {folder} is incomplete: missing {', '.join(missing)}; "
            f"expected the python-version files of {subfolder}/"
        )
    return folder


def _to_dataset(name, train, test, num_classes, image_shape, mean, std, max_train, max_test) -> ImageDataset:
    (x_train, y_train), (x_test, y_test) = train, test
    mean, std = check_stats(mean, std, check_image_shape(image_shape)[0])
    if max_train is not None:
        x_train, y_train = x_train[:max_train], y_train[:max_train]
    if max_test is not None:
        x_test, y_test = x_test[:max_test], y_test[:max_test]
    if len(x_train) == 0 or len(x_test) == 0:
        raise VizpipeError(f"{name}: a split is empty; check dataset.max_train and dataset.max_test")
    if y_train.max() >= num_classes or y_test.max() >= num_classes or min(y_train.min(), y_test.min()) < 0:
        raise VizpipeError(f"{name}: labels outside 0..{num_classes - 1}; the batch files are corrupt")

    def convert(x):
        return resize_and_normalize(torch.from_numpy(x.astype(np.float32) / 255.0), image_shape, mean, std)

    return ImageDataset(
        name=name,
        x_train=convert(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=convert(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=num_classes,
        mean=list(mean),
        std=list(std),
    )


def cifar10(
    data_path: str | None = None,
    image_shape: list[int] = (3, 32, 32),
    num_classes: int = 10,
    mean: list[float] = tuple(CIFAR10_MEAN),
    std: list[float] = tuple(CIFAR10_STD),
    max_train: int | None = None,
    max_test: int | None = None,
) -> ImageDataset:
    """Load CIFAR-10 from ``data_path`` (the ``cifar-10-batches-py`` folder or its parent)."""
    check_num_classes("CIFAR-10", num_classes, 10)
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    folder = _find_folder(data_path, "cifar-10-batches-py", [*train_files, "test_batch"], "CIFAR-10")
    parts = [_batch_arrays(folder / name, "labels") for name in train_files]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _batch_arrays(folder / "test_batch", "labels")
    return _to_dataset("cifar10", train, test, 10, image_shape, mean, std, max_train, max_test)


def cifar100(
    data_path: str | None = None,
    image_shape: list[int] = (3, 32, 32),
    num_classes: int = 100,
    mean: list[float] = tuple(CIFAR100_MEAN),
    std: list[float] = tuple(CIFAR100_STD),
    max_train: int | None = None,
    max_test: int | None = None,
) -> ImageDataset:
    """Load CIFAR-100 (fine labels) from ``data_path`` (the ``cifar-100-python`` folder or its parent)."""
    check_num_classes("CIFAR-100", num_classes, 100)
    folder = _find_folder(data_path, "cifar-100-python", ["train", "test"], "CIFAR-100")
    train = _batch_arrays(folder / "train", "fine_labels")
    test = _batch_arrays(folder / "test", "fine_labels")
    return _to_dataset("cifar100", train, test, 100, image_shape, mean, std, max_train, max_test)
