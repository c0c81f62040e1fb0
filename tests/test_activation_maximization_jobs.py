"""Activation-maximization jobs through the real CLI: per-layer resume after kill -9,
dead channels in results.h5, the log, MLflow and the figures."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest
import torch
from conftest import run_cli

from vizpipe import store
from vizpipe.models import SmallCNN

AM = "analysis.activation_maximization"
LAYERS = ["conv1", "conv2", "fc1"]
SWEEP = [
    "weights.source=random", "dataset.image_shape=[1,8,8]", "analysis=[activation_maximization]",
    f"{AM}.layers=[{','.join(LAYERS)}]", f"{AM}.channels=0:4", f"{AM}.iterations=80", f"{AM}.tv_weight=0.1",
    f"{AM}.frame_every=20", "tracking.enabled=false", "figures.enabled=false", "progress=false",
]


def complete_layers(path: Path) -> list[str]:
    """Return the layers whose group has ``complete=True``, or none while the job has the file open or before it exists."""
    try:
        with h5py.File(path, "r", swmr=True) as handle:
            if "activation_maximization" not in handle:
                return []
            return [name for name, group in handle["activation_maximization"].items() if group.attrs.get("complete")]
    except (OSError, KeyError):
        return []


def layer_arrays(path: Path) -> dict[str, np.ndarray]:
    results = store.read_results(path)
    return {
        f"{layer}/{name}": value
        for layer, group in results["activation_maximization"].items()
        for name, value in group.items()
    }


def assert_same_arrays(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of ``SWEEP``; returns its results.h5."""
    root = tmp_path_factory.mktemp("reference")
    completed = run_cli([f"hydra.run.dir={root}/run", *SWEEP], cwd=root)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return root / "run" / "results.h5"


@pytest.mark.slow
def test_killed_sweep_resumes_layer_by_layer(tmp_path, reference):
    run_dir = tmp_path / "killed"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    command = [str(Path(sys.executable).parent / "vizpipe"), f"hydra.run.dir={run_dir}", *SWEEP]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not complete_layers(run_dir / "results.h5") and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed; raise the iterations"
    process.send_signal(signal.SIGKILL)
    process.wait()

    results = store.read_results(run_dir / "results.h5")  # readable after kill -9
    finished = [layer for layer in LAYERS if results.group_attrs.get(f"activation_maximization/{layer}", {}).get("complete")]
    assert finished == ["conv1"]
    assert results.group_attrs["activation_maximization"].get("complete") is None

    resumed = run_cli([f"hydra.run.dir={run_dir}", *SWEEP], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "Skipping activation maximization of conv1: its group is already complete" in log
    assert "Skipping activation maximization of conv2" not in log
    assert "Activation maximization conv2: 4 images" in log
    assert "Activation maximization fc1: 4 images" in log
    assert_same_arrays(layer_arrays(reference), layer_arrays(run_dir / "results.h5"))
    assert complete_layers(run_dir / "results.h5") == sorted(LAYERS)


def test_half_written_layer_group_is_recomputed(tmp_path, reference):
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    shutil.copy(reference, run_dir / "results.h5")
    # What a job killed while writing conv2 leaves: no complete attributes, a missing and a garbled dataset.
    with h5py.File(run_dir / "results.h5", "a") as handle:
        del handle["activation_maximization"].attrs["complete"]
        group = handle["activation_maximization/conv2"]
        del group.attrs["complete"]
        del group["dead"]
        group["images"][...] = np.nan

    rerun = run_cli([f"hydra.run.dir={run_dir}", *SWEEP], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    log = rerun.stdout + rerun.stderr
    assert "Skipping activation maximization of conv1" in log
    assert "Skipping activation maximization of fc1" in log
    assert "Skipping activation maximization of conv2" not in log
    assert "Activation maximization conv2: 4 images" in log
    assert_same_arrays(layer_arrays(reference), layer_arrays(run_dir / "results.h5"))
    with h5py.File(run_dir / "results.h5", "r") as handle:
        assert handle["activation_maximization"].attrs["complete"]
        assert handle["activation_maximization/conv2"].attrs["complete"]


def test_job_reports_dead_channels(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(input_channel=1, class_number=10)
    with torch.no_grad():
        model.conv1.weight[[2, 5]] = 0.0  # constant channels: zero gradient with respect to the input
    torch.save(model.state_dict(), tmp_path / "dead.pt")

    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", "weights.source=checkpoint",
         f"weights.checkpoint={tmp_path / 'dead.pt'}", "dataset.image_shape=[1,8,8]", "figures.formats=[png]",
         "progress=false", "analysis=[activation_maximization]", f"{AM}.layers=[conv1,conv2]",
         f"{AM}.channels=0:8", f"{AM}.iterations=10"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    warnings = [line for line in completed.stdout.splitlines() if "channels are dead" in line]
    assert len(warnings) == 1, completed.stdout[-3000:]
    assert "Activation maximization conv1: 2 of 8 channels are dead" in warnings[0]
    assert warnings[0].endswith("channels [2, 5]")

    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        assert handle["activation_maximization/conv1/dead"][()].tolist() == [c in (2, 5) for c in range(8)]
        assert not handle["activation_maximization/conv2/dead"][()].any()
        assert np.isfinite(handle["activation_maximization/conv1/images"][()]).all()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])
    assert run.data.metrics["activation_maximization/conv1/dead_channels"] == 2
    assert run.data.metrics["activation_maximization/conv2/dead_channels"] == 0
    images = [item.path for item in client.list_artifacts(run.info.run_id, "images")]
    for layer in ("conv1", "conv2"):
        logged = [path for path in images if path.startswith(f"images/activation_maximization~{layer}+step+0+")]
        assert sorted(path.rsplit(".", 1)[1] for path in logged) == ["png", "webp"], images
    figures = [item.path for item in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/activation_maximization_conv1.png" in figures


def test_grid_figure_greys_dead_tiles(tmp_path):
    from PIL import Image

    from vizpipe.render.activation_maximization import render_activation_maximization

    def grey_pixels(dead: list[bool]) -> int:
        results = store.Results(tmp_path / "none.h5")
        results["activation_maximization"] = {"conv1": {
            "display_images": np.ones((2, 1, 6, 6), dtype=np.float32),  # white images
            "channels": np.array([0, 1]), "activations": np.array([1.0, 0.0]), "dead": np.array(dead),
            "frames": np.full((2, 2, 1, 6, 6), 255, dtype=np.uint8), "history": np.zeros((3, 2)),
        }}
        out = tmp_path / str(dead)
        out.mkdir()
        render_activation_maximization(results, out, ["png"])
        pixels = np.asarray(Image.open(out / "activation_maximization_conv1.png").convert("RGB")).astype(int)
        return int((np.abs(pixels - 128) <= 2).all(axis=2).sum())

    live, with_dead = grey_pixels([False, False]), grey_pixels([False, True])
    assert live < 100  # anti-aliased text edges only
    assert with_dead > 20 * live + 1000, (live, with_dead)
