import h5py
import numpy as np
import pytest
import torch

from vizpipe import store
from vizpipe.errors import VizpipeError


def test_round_trip(tmp_path):
    path = store.create_results_file(tmp_path / "results.h5", {"config_yaml": "a: 1\n", "weight_fingerprint": "abc"})
    loss = torch.randn(3, 4, dtype=torch.float64)
    loss[0, 0] = float("nan")
    store.write_group(path, "landscape", {"loss": loss, "parameter_names": ["a.weight", "b.bias"], "direction_1": {"a.weight": torch.ones(2, 2)}}, {"max_val": None, "seed": 3})
    results = store.read_results(path)
    assert results.attrs["schema_version"] == store.SCHEMA_VERSION
    assert results.attrs["weight_fingerprint"] == "abc"
    np.testing.assert_array_equal(results["landscape"]["loss"], loss.numpy())
    assert results["landscape"]["parameter_names"] == ["a.weight", "b.bias"]
    assert results["landscape"]["direction_1"]["a.weight"].shape == (2, 2)
    assert results.group_attrs["landscape"]["max_val"] is None
    assert results.group_attrs["landscape"]["seed"] == 3


def test_rewriting_a_group_replaces_only_it(tmp_path):
    path = store.create_results_file(tmp_path / "r.h5", {})
    store.write_group(path, "hessian", {"eigenvalues": [1.0]})
    store.write_group(path, "activation_maximization/conv1", {"images": np.zeros((2, 1, 3, 3))})
    store.write_group(path, "hessian", {"eigenvalues": [2.0, 3.0]})
    results = store.read_results(path)
    assert results["hessian"]["eigenvalues"].tolist() == [2.0, 3.0]
    assert results["activation_maximization"]["conv1"]["images"].shape == (2, 1, 3, 3)


def test_foreign_and_damaged_files_rejected(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = [1, 2]
    with pytest.raises(VizpipeError, match="not a vizpipe results file"):
        store.read_results(foreign)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(VizpipeError, match="cannot read"):
        store.read_results(garbage)
    with pytest.raises(VizpipeError, match="not found"):
        store.read_results(tmp_path / "missing.h5")


def test_write_waits_for_reader_lock(tmp_path):
    import subprocess
    import sys

    path = store.create_results_file(tmp_path / "results.h5", {})
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, h5py\n"
         f"handle = h5py.File({str(path)!r}, 'r', swmr=True)\n"
         "print('open', flush=True)\n"
         "time.sleep(1.0)\n"
         "handle.close()\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        with pytest.raises(BlockingIOError):  # what a writer without retries gets
            h5py.File(path, "a", libver="latest")
        store.write_group(path, "analysis", {"values": torch.arange(3)}, {"complete": True})
    finally:
        reader.wait(timeout=30)
    assert reader.returncode == 0
    with h5py.File(path, "r") as handle:
        assert handle["analysis/values"][()].tolist() == [0, 1, 2]
        assert handle["analysis"].attrs["complete"]
