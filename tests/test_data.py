import os
import pickle

import numpy as np
import pytest
import torch

from vizpipe.data import cifar10, cifar100, digits, load_cifar_batch, synthetic
from vizpipe.errors import VizpipeError


def write_batch(path, count, label_key="labels", seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"testing batch",
        label_key.encode(): rng.integers(0, 10, count).tolist(),
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(count)],
    }
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)
    return batch


@pytest.fixture
def cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [write_batch(folder / f"data_batch_{i}", 6, seed=i) for i in range(1, 6)]
    test = write_batch(folder / "test_batch", 4, seed=9)
    return tmp_path, batches, test


def test_cifar10_reads_standard_batches(cifar_folder):
    root, batches, test = cifar_folder
    dataset = cifar10(data_path=str(root))
    assert dataset.x_train.shape == (30, 3, 32, 32)
    assert dataset.x_test.shape == (4, 3, 32, 32)
    assert dataset.y_train.tolist() == sum((b[b"labels"] for b in batches), [])
    first_pixel = test[b"data"][0, 0] / 255.0  # channel 0, row 0, column 0
    expected = (first_pixel - 0.4914) / 0.2470
    assert dataset.x_test[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-5)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_batch(folder / "train", 5, "fine_labels")
    write_batch(folder / "test", 3, "fine_labels", seed=1)
    dataset = cifar100(data_path=str(tmp_path))
    assert dataset.num_classes == 100
    assert len(dataset.y_test) == 3


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_calls_a_function_is_rejected(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil_batch"
    with open(path, "wb") as handle:
        pickle.dump({b"data": _RunsCode(marker), b"labels": [1]}, handle, protocol=2)
    with pytest.raises(VizpipeError, match=r"'(posix|os)\.system' is not allowed"):
        load_cifar_batch(path)
    assert not marker.exists()


def test_truncated_batch_is_a_clear_error(tmp_path):
    path = tmp_path / "data_batch_1"
    write_batch(path, 4)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VizpipeError, match="corrupt"):
        load_cifar_batch(path)


def test_missing_and_incomplete_cifar_folders(tmp_path):
    with pytest.raises(VizpipeError, match="not found"):
        cifar10(data_path=str(tmp_path / "nowhere"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    write_batch(tmp_path / "cifar-10-batches-py" / "data_batch_1", 2)
    with pytest.raises(VizpipeError, match="missing data_batch_2"):
        cifar10(data_path=str(tmp_path))


def test_digits_split_and_shape():
    dataset = digits(image_shape=[3, 12, 12])
    assert dataset.x_train.shape == (1347, 3, 12, 12)
    assert dataset.x_test.shape == (450, 3, 12, 12)
    assert torch.equal(dataset.x_train[:, 0], dataset.x_train[:, 2])
    assert sorted(dataset.y_test.unique().tolist()) == list(range(10))
    again = digits(image_shape=[3, 12, 12])
    assert torch.equal(dataset.y_test, again.y_test)


def test_synthetic_is_seeded():
    first = synthetic(image_shape=[4, 5, 6], num_classes=3, num_train=10, num_test=5, seed=1)
    second = synthetic(image_shape=[4, 5, 6], num_classes=3, num_train=10, num_test=5, seed=1)
    assert first.x_train.shape == (10, 4, 5, 6)
    assert torch.equal(first.x_train, second.x_train)
