"""MLflow tracking against a real `mlflow server` and the local SQLite store, and `vizpipe-log`."""

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import mlflow
import pytest
from conftest import run_cli

from vizpipe.tracking import MAX_PARAM_LENGTH, PARAM_BATCH_SIZE, Tracker, flatten, job_run_name

JOB = [
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=100",
    "figures.formats=[png]",
    "progress=false",
    "weights.source=random",
    "analysis=[hessian]",
    "analysis.hessian.max_iterations=3",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_mlflow_server(root: Path, env_extra=None):
    """Run a real `mlflow server` on 127.0.0.1 with a SQLite backend; stop it with its process group."""
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log_file = open(root / "server.log", "w")
    server = subprocess.Popen(
        command, cwd=root, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", **(env_extra or {})),
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with running_mlflow_server(tmp_path_factory.mktemp("server")) as uri:
        yield uri


# Imported by every Python process of the server (uvicorn runs in a child process),
# it sets the parameter limit of MLflow 1.28 to 2.7, which rejected longer values.
OLD_LIMIT_SITECUSTOMIZE = """
import mlflow.utils.validation
mlflow.utils.validation.MAX_PARAM_VAL_LENGTH = 500
"""


@pytest.fixture(scope="module")
def old_limit_mlflow_server(tmp_path_factory):
    """A real `mlflow server` that rejects param values over 500 characters, as servers before MLflow 2.8 did."""
    root = tmp_path_factory.mktemp("old_server")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(OLD_LIMIT_SITECUSTOMIZE)
    env = {"PYTHONPATH": str(root / "site"), "MLFLOW_TRUNCATE_LONG_VALUES": "false"}
    with running_mlflow_server(root, env) as uri:
        yield uri


def test_flatten_shortens_long_values_with_hash():
    long_value = "x" * (MAX_PARAM_LENGTH + 1)
    flat = flatten({"a": {"b": long_value, "c": 3}, "empty": {}})
    digest = hashlib.sha256(long_value.encode()).hexdigest()[:12]
    assert len(flat["a.b"]) == MAX_PARAM_LENGTH
    assert flat["a.b"].endswith(f"...sha256:{digest}")
    assert flat["a.c"] == "3"
    assert flat["empty"] == "{}"


def test_run_name_from_analyses_and_overrides():
    name = job_run_name(["landscape", "hessian"], ["analysis=[landscape,hessian]", "analysis.landscape.noise_range=0.1", "seed=3"])
    assert name == "landscape+hessian noise_range=0.1,seed=3"
    assert job_run_name(["hessian"], []) == "hessian"


def test_params_logged_in_batches_to_local_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {f"group{g}": {f"key{k}": k for k in range(60)} for g in range(4)}  # 240 params: 3 batches
    params["long"] = "y" * 7000
    tracker = Tracker(True, uri, "batches", tmp_path)
    tracker.start("batches", params)
    tracker.end()
    assert tracker.enabled, "no batch exceeded MLflow's limits"
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(tracker.run_id)
    assert len(run.data.params) == 241 > 2 * PARAM_BATCH_SIZE
    assert run.data.params["group3.key59"] == "59"
    assert len(run.data.params["long"]) == MAX_PARAM_LENGTH
    assert run.info.status == "FINISHED"


def test_params_shortened_to_configured_length(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    long_value = "z" * 900
    tracker = Tracker(True, uri, "short", tmp_path, max_param_length=500)
    tracker.start("short", {"long": long_value, "short": "abc"})
    tracker.end()
    params = mlflow.MlflowClient(tracking_uri=uri).get_run(tracker.run_id).data.params
    digest = hashlib.sha256(long_value.encode()).hexdigest()[:12]
    assert len(params["long"]) == 500
    assert params["long"].startswith("z" * 400)
    assert params["long"].endswith(f"...sha256:{digest}")
    assert params["short"] == "abc"


def test_param_length_below_minimum_rejected(tmp_path):
    completed = run_cli([f"hydra.run.dir={tmp_path}/run", *JOB, "tracking.max_param_length=20"], cwd=tmp_path)
    assert completed.returncode == 2
    assert "invalid tracking.max_param_length 20: it must be at least 100" in completed.stderr


@pytest.mark.slow
def test_old_server_limit_shortens_and_retries(old_limit_mlflow_server, tmp_path):
    long_name = "n" * 700
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *JOB,
         f"tracking.tracking_uri={old_limit_mlflow_server}", "tracking.experiment_name=old", f"tracking.run_name={long_name}"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    assert "accepts parameter values of at most 500 characters" in output
    assert "tracking is off" not in output
    client = mlflow.MlflowClient(tracking_uri=old_limit_mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("old").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    digest = hashlib.sha256(long_name.encode()).hexdigest()[:12]
    assert run.data.params["tracking.run_name"] == long_name[: 500 - 22] + f"...sha256:{digest}"
    assert run.data.params["analysis.hessian.max_iterations"] == "3"
    assert "hessian/eigenvalue/conv1.weight" in run.data.metrics


def test_image_logged_under_sanitized_key(tmp_path):
    from PIL import Image

    Image.new("RGB", (12, 8), (200, 10, 10)).save(tmp_path / "grid.png")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(True, uri, "images", tmp_path)
    tracker.start("images", {})
    tracker.log_image(tmp_path / "grid.png", "activation_maximization/block[0]:conv")
    tracker.log_image(tmp_path / "missing.png", "activation_maximization/missing")
    tracker.end()
    assert tracker.enabled
    client = mlflow.MlflowClient(tracking_uri=uri)
    paths = [item.path for item in client.list_artifacts(tracker.run_id, "images")]
    assert len(paths) == 2, paths  # the PNG and its compressed copy; the missing file is skipped
    png = next(path for path in paths if path.endswith(".png"))
    assert png.startswith("images/activation_maximization~block_0__conv+step+0+")
    local = client.download_artifacts(tracker.run_id, png, str(tmp_path / "download"))
    with Image.open(local) as image:
        assert image.size == (12, 8)
        assert image.getpixel((0, 0)) == (200, 10, 10)


@pytest.mark.slow
def test_job_logs_to_real_server(mlflow_server, tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *JOB,
         f"tracking.tracking_uri={mlflow_server}", "tracking.experiment_name=server"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("server").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith(f"hessian output_root={tmp_path}/outputs,")
    assert ",max_iterations=3," in run.info.run_name
    assert run.data.params["analysis.hessian.max_iterations"] == "3"
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        names = [n.decode() for n in handle["hessian/parameter_names"][()]]
        eigenvalues = handle["hessian/eigenvalues"][()]
    for name, value in zip(names, eigenvalues):
        assert run.data.metrics[f"hessian/eigenvalue/{name}"] == pytest.approx(float(value))
    # Artifacts go through the server's artifact proxy and come back byte for byte.
    downloaded = client.download_artifacts(run.info.run_id, "results.h5", str(tmp_path / "download"))
    assert Path(downloaded).read_bytes() == (tmp_path / "run" / "results.h5").read_bytes()
    assert "figures/hessian_eigenvalues.png" in {a.path for a in client.list_artifacts(run.info.run_id, "figures")}


@pytest.mark.slow
def test_unreachable_server_then_log_later(mlflow_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *JOB, f"tracking.tracking_uri={dead}"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    output = completed.stdout + completed.stderr
    run_dir = (tmp_path / "run").resolve()
    assert f"log it later with: vizpipe-log {run_dir}" in output
    assert f"mlflow run: none; log it later with: vizpipe-log {run_dir}" in completed.stdout

    logged = run_cli([str(run_dir), "--tracking-uri", mlflow_server, "--experiment", "later"], cwd=tmp_path,
                     entry="vizpipe-log")
    assert logged.returncode == 0, logged.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["vizpipe.logged_later"] == "true"
    assert run.data.params["tracking.tracking_uri"] == dead
    assert "hessian/eigenvalue/conv1.weight" in run.data.metrics
    assert {"results.h5", "figures", ".hydra"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_log_later_sweep_folder_to_local_store(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    completed = run_cli(
        ["-m", f"hydra.sweep.dir={tmp_path}/sweep", f"output_root={tmp_path}/outputs", *JOB,
         f"tracking.tracking_uri={dead}", "seed=0,1"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    store = tmp_path / "later.db"
    logged = run_cli([str(tmp_path / "sweep"), "--tracking-uri", f"sqlite:///{store}"], cwd=tmp_path, entry="vizpipe-log")
    assert logged.returncode == 0, logged.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.run_name == "sweep hessian seed=0,1"
    assert parents[0].info.status == "FINISHED"
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}


def test_log_later_rejects_non_run_folder(tmp_path):
    completed = run_cli([str(tmp_path)], cwd=tmp_path, entry="vizpipe-log")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"vizpipe-log: error: {tmp_path}/.hydra/config.yaml not found; "
        "pass a vizpipe run folder (it holds .hydra/config.yaml and job.json)"
    )
