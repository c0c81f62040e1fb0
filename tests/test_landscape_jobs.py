"""Landscape jobs through the real CLI: resume after kill -9, direction reuse, torchrun."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import mlflow
import numpy as np
import pytest

from conftest import run_cli

LANDSCAPE = [
    "weights.source=random",
    "dataset.image_shape=[1,16,16]",
    "analysis=[landscape]",
    "analysis.landscape.resolution=15",
    "analysis.landscape.compile=false",
    "tracking.enabled=false",
    "figures.enabled=false",
    "progress=false",
]


def done_points(path: Path) -> int:
    try:
        with h5py.File(path, "r", swmr=True) as handle:
            return int(handle["landscape/done"][()].sum()) if "landscape/done" in handle else 0
    except (OSError, KeyError):
        return 0


def test_killed_landscape_resumes_to_identical_values(tmp_path):
    reference = run_cli([f"hydra.run.dir={tmp_path}/reference", *LANDSCAPE], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "killed"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    tracked = [*LANDSCAPE, "tracking.enabled=true", f"output_root={tmp_path}/outputs"]
    command = [str(Path(sys.executable).parent / "vizpipe"), f"hydra.run.dir={run_dir}", *tracked]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while done_points(run_dir / "results.h5") < 20 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be killed; raise the resolution"
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = done_points(run_dir / "results.h5")
    assert 20 <= partial < 225

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vizpipe").experiment_id
    (killed_run,) = client.search_runs([experiment])
    assert killed_run.info.status == "RUNNING", "SIGKILL cannot end the run"

    resumed = run_cli([f"hydra.run.dir={run_dir}", *tracked], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming the landscape" in resumed.stdout + resumed.stderr
    statuses = {run.info.run_id: run.info.status for run in client.search_runs([experiment])}
    assert statuses.pop(killed_run.info.run_id) == "KILLED", "the rerun ends the killed job's run"
    assert list(statuses.values()) == ["FINISHED"]
    with h5py.File(tmp_path / "reference" / "results.h5") as first, h5py.File(run_dir / "results.h5") as second:
        np.testing.assert_array_equal(first["landscape/loss"][()], second["landscape/loss"][()])
        np.testing.assert_array_equal(first["landscape/accuracy"][()], second["landscape/accuracy"][()])
        assert second["landscape/done"][()].all()
        assert second["landscape"].attrs["complete"]


def test_other_config_on_same_folder_is_rejected(tmp_path):
    first = run_cli([f"hydra.run.dir={tmp_path}/run", *LANDSCAPE[:3], "analysis.landscape.resolution=3",
                     "tracking.enabled=false", "figures.enabled=false"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli([f"hydra.run.dir={tmp_path}/run", *LANDSCAPE[:3], "analysis.landscape.resolution=5",
                      "tracking.enabled=false", "figures.enabled=false"], cwd=tmp_path)
    assert second.returncode != 0
    assert "contains results of another config" in second.stderr
    assert "overwrite=true" in second.stderr
    with h5py.File(tmp_path / "run" / "results.h5") as handle:
        assert handle["landscape/loss"].shape == (3, 3), "the first job's results must survive"


def test_directions_reused_across_jobs(tmp_path):
    wide = run_cli([f"hydra.run.dir={tmp_path}/wide", *LANDSCAPE, "analysis.landscape.resolution=3"], cwd=tmp_path)
    assert wide.returncode == 0, wide.stderr[-2000:]
    narrow = run_cli(
        [f"hydra.run.dir={tmp_path}/narrow", *LANDSCAPE, "analysis.landscape.resolution=3",
         "analysis.landscape.noise_range=0.1", f"analysis.landscape.directions_from={tmp_path}/wide"],
        cwd=tmp_path,
    )
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    with h5py.File(tmp_path / "wide" / "results.h5") as first, h5py.File(tmp_path / "narrow" / "results.h5") as second:
        for name in first["landscape/direction_1"]:
            np.testing.assert_array_equal(first["landscape/direction_1"][name][()], second["landscape/direction_1"][name][()])
            np.testing.assert_array_equal(first["landscape/direction_2"][name][()], second["landscape/direction_2"][name][()])
        assert second["landscape/x"][()].max() == pytest.approx(0.1)

    line = run_cli(
        [f"hydra.run.dir={tmp_path}/line", *LANDSCAPE, "analysis.landscape.dims=1",
         f"analysis.landscape.directions_from={tmp_path}/wide"],
        cwd=tmp_path,
    )
    assert line.returncode != 0
    assert "directions are 2D but the landscape is 1D" in line.stderr
    assert "Traceback" not in line.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    options = [
        *[o for o in LANDSCAPE if not o.startswith("analysis=")], "analysis=[landscape,hessian]",
        "analysis.landscape.resolution=7", "analysis.hessian.max_iterations=5", "evaluation.batch_size=100",
    ]
    single = run_cli([f"hydra.run.dir={tmp_path}/single", *options], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]

    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "vizpipe", f"hydra.run.dir={tmp_path}/ranks", *options],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with h5py.File(tmp_path / "single" / "results.h5") as first, h5py.File(tmp_path / "ranks" / "results.h5") as second:
        np.testing.assert_array_equal(first["landscape/loss"][()], second["landscape/loss"][()])
        np.testing.assert_array_equal(first["landscape/accuracy"][()], second["landscape/accuracy"][()])
        # Hessian products are summed over the ranks' batches, so only the summation order differs.
        np.testing.assert_allclose(first["hessian/eigenvalues"][()], second["hessian/eigenvalues"][()], rtol=1e-5)


@pytest.mark.parametrize("compile_option, stop_signal", [
    ("false", signal.SIGINT),
    ("false", signal.SIGTERM),
    pytest.param("true", signal.SIGINT, marks=pytest.mark.slow),
])
def test_interrupt_stops_cleanly_and_keeps_partial_points(tmp_path, compile_option, stop_signal):
    run_dir = tmp_path / "interrupted"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    # 41x41 points: after the 10th point is seen, the rest take seconds, so the signal
    # arrives while the grid is still running (with 15x15 the job could finish first).
    command = [str(Path(sys.executable).parent / "vizpipe"), f"hydra.run.dir={run_dir}", f"output_root={tmp_path}/outputs",
               *LANDSCAPE[:3], "analysis.landscape.resolution=41", f"analysis.landscape.compile={compile_option}",
               "figures.enabled=false", "progress=false"]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while done_points(run_dir / "results.h5") < 10 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the job ended before it could be interrupted"
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "interrupted" in stderr
    assert "to resume" in stderr
    with h5py.File(run_dir / "results.h5", "r") as handle:
        assert not handle["landscape"].attrs["complete"]
        assert 10 <= handle["landscape/done"][()].sum() < 41 * 41

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])
    assert [run.info.status for run in runs] == ["KILLED"]


def test_hessian_eigenvector_direction_matches_exact(tmp_path):
    import torch
    from torch.func import functional_call, hessian

    from vizpipe.data import digits
    from vizpipe.models import MLP

    torch.manual_seed(0)
    model = MLP([1, 8, 8], 10, [8])
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", "model=mlp", "model.hidden=[8]", "dataset.image_shape=[1,8,8]",
         "weights.source=checkpoint", f"weights.checkpoint={tmp_path / 'mlp.pt'}", "evaluation.max_samples=100",
         "analysis=[landscape]", "analysis.landscape.direction=hessian", "analysis.landscape.dims=1",
         "analysis.landscape.resolution=3", "tracking.enabled=false", "figures.enabled=false", "progress=false"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]

    data = digits(image_shape=[1, 8, 8])
    x, y = data.x_test[:100].double(), data.y_test[:100]
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    flat = torch.cat([p.flatten() for p in params.values()])

    def loss_of(vector):
        merged, offset = {}, 0
        for name, p in params.items():
            merged[name] = vector[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.nn.functional.cross_entropy(functional_call(model.double(), merged, (x,)), y)

    values, vectors = torch.linalg.eigh(hessian(loss_of)(flat))
    with h5py.File(tmp_path / "run" / "results.h5") as handle:
        group = handle["landscape"]
        assert group.attrs["kind"] == "hessian"
        stored_value = float(group["hessian_eigenvalues"][0])
        names = [n.decode() for n in group["parameter_names"][()]]
        stored_vector = np.concatenate([group["direction_1"][name][()].ravel() for name in names])
    assert stored_value == pytest.approx(float(values[-1]), rel=1e-3)
    cosine = abs(float(np.dot(stored_vector, vectors[:, -1].numpy())) / np.linalg.norm(stored_vector))
    assert cosine > 0.999
