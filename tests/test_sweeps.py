"""Hydra multiruns of the real CLI: parent and child MLflow runs, failed sweep points, launchers."""

import json
import multiprocessing
import re
from pathlib import Path

import h5py
import mlflow
import pytest
from conftest import run_cli

from vizpipe.tracking import SWEEP_STATE_FILE, SweepInfo, Tracker

BASE = [
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=100",
    "figures.formats=[png]",
    "progress=false",
    "weights.source=random",
]


def runs_of(store: Path, experiment: str = "vizpipe"):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = sorted(
        (run for run in runs if "mlflow.parentRunId" in run.data.tags),
        key=lambda run: int(run.data.tags["vizpipe.job_number"]),
    )
    return client, parents, children


@pytest.fixture(scope="module")
def am_sweep(tmp_path_factory):
    """Four jobs: layers conv1, conv2 times tv_weight 0.0 and the invalid -1.0."""
    root = tmp_path_factory.mktemp("am_sweep")
    completed = run_cli(
        ["-m", f"hydra.sweep.dir={root}/sweep", f"output_root={root}/outputs", *BASE,
         "analysis=[activation_maximization]", "analysis.activation_maximization.iterations=5",
         "analysis.activation_maximization.channels=[0,1]",
         "analysis.activation_maximization.layers=[conv1],[conv2]",
         "analysis.activation_maximization.tv_weight=choice(0.0,-1.0)"],
        cwd=root,
    )
    return root, completed


def test_sweep_failed_point_spares_other_jobs(am_sweep):
    root, completed = am_sweep
    assert completed.returncode != 0, "Hydra reports the failed sweep point in the exit status"
    # Job order is the Cartesian product in command-line order: tv_weight varies fastest.
    expected = [(layer, tv) for layer in ("conv1", "conv2") for tv in (0.0, -1.0)]
    for number, (layer, tv_weight) in enumerate(expected):
        job = root / "sweep" / str(number)
        record = json.loads((job / "job.json").read_text())
        if tv_weight < 0:
            assert record["status"] == "FAILED"
            assert not (job / "results.h5").exists()
            continue
        assert record["status"] == "FINISHED"
        with h5py.File(job / "results.h5", "r") as handle:
            group = handle[f"activation_maximization/{layer}"]
            assert group["channels"][()].tolist() == [0, 1]
            assert group.attrs["tv_weight"] == tv_weight


def test_sweep_has_one_parent_and_child_per_job(am_sweep):
    root, _ = am_sweep
    client, parents, children = runs_of(root / "outputs" / "mlflow.db")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["vizpipe.role"] == "sweep"
    assert parent.info.run_name == (
        "sweep activation_maximization layers=[conv1],[conv2],tv_weight=choice(0.0,-1.0)"
    )
    assert parent.data.params["sweep.analysis.activation_maximization.tv_weight"] == "choice(0.0,-1.0)"
    assert parent.info.status == "FAILED", "a sweep with a failed job is marked FAILED"
    assert "multirun.yaml" in {item.path for item in client.list_artifacts(parent.info.run_id)}

    assert len(children) == 4
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["vizpipe.sweep_dir"] == str((root / "sweep").resolve())
    assert children[0].info.run_name == "activation_maximization layers=[conv1],tv_weight=0.0"
    assert children[3].info.run_name == "activation_maximization layers=[conv2],tv_weight=-1.0"


def test_failed_child_holds_its_error(am_sweep):
    root, _ = am_sweep
    client, _, children = runs_of(root / "outputs" / "mlflow.db")
    for run in children:
        failed = float(run.data.params["analysis.activation_maximization.tv_weight"]) < 0
        assert run.info.status == ("FAILED" if failed else "FINISHED"), run.info.run_name
        assert run.info.end_time is not None, "no run is left active"
        if not failed:
            assert "vizpipe.error" not in run.data.tags
            continue
        assert run.data.tags["vizpipe.error"] == (
            "VizpipeError: invalid analysis.activation_maximization.tv_weight -1.0: it must be >= 0"
        )
        error_file = client.download_artifacts(run.info.run_id, "error.txt", str(root / run.info.run_id))
        assert "Traceback" in Path(error_file).read_text()


def test_child_metric_names_line_up(am_sweep):
    root, _ = am_sweep
    _, _, children = runs_of(root / "outputs" / "mlflow.db")
    finished = [run for run in children if run.info.status == "FINISHED"]
    layers = [run.data.params["analysis.activation_maximization.layers"] for run in finished]
    assert layers == ["['conv1']", "['conv2']"]
    for run in finished:
        layer = run.data.params["analysis.activation_maximization.layers"][2:-2]
        names = set(run.data.metrics)
        per_layer = {
            f"activation_maximization/{layer}/mean_final_activation",
            f"activation_maximization/{layer}/mean_start_activation",
            f"activation_maximization/{layer}/dead_channels",
        }
        assert per_layer <= names
        assert run.data.metrics[f"activation_maximization/{layer}/dead_channels"] == 0
        per_channel = names - per_layer
        assert per_channel, "each channel's final activation is logged"
        assert all(re.fullmatch(rf"activation_maximization/{layer}/final_activation/\d+", name) for name in per_channel)


def _start_child(uri: str, sweep_dir: str, job_number: int, queue) -> None:
    sweep = SweepInfo(Path(sweep_dir), job_number, ["seed=range(0,6)"], {"seed"}, ["hessian"])
    tracker = Tracker(True, uri, "race", sweep_dir)
    tracker.start(f"job {job_number}", {"seed": job_number}, sweep=sweep)
    tracker.end("FINISHED", sweep)
    queue.put((tracker.run_id, tracker.parent_run_id))


@pytest.mark.slow  # six processes that each import mlflow: about 90 s on 2 shared cores
def test_concurrent_jobs_create_one_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(True, uri, "race", tmp_path).start("create the store", {})  # schema migration outside the race
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_start_child, args=(uri, str(tmp_path), n, queue)) for n in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    results = [queue.get(timeout=5) for _ in processes]

    parent_ids = {parent for _, parent in results}
    assert len(parent_ids) == 1
    assert len({child for child, _ in results}) == 6
    state = json.loads((tmp_path / SWEEP_STATE_FILE).read_text())
    assert state["parent_run_id"] in parent_ids
    assert state["jobs"] == {str(n): "FINISHED" for n in range(6)}
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    experiment_id = client.get_experiment_by_name("race").experiment_id
    assert len(client.search_runs([experiment_id], filter_string="tags.`vizpipe.role` = 'sweep'")) == 1


@pytest.mark.slow
def test_joblib_jobs_share_one_parent(tmp_path):
    completed = run_cli(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path}/sweep",
         f"output_root={tmp_path}/outputs", *BASE, "analysis=[hessian]", "analysis.hessian.max_iterations=3",
         "seed=range(0,2)"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tracking is off" not in completed.stdout + completed.stderr
    _, parents, children = runs_of(tmp_path / "outputs" / "mlflow.db")
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert [run.data.params["seed"] for run in children] == ["0", "1"]
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    # The two seeds give two different random models, so two different spectra.
    eigenvalues = [run.data.metrics["hessian/eigenvalue/conv1.weight"] for run in children]
    assert eigenvalues[0] != eigenvalues[1]


@pytest.mark.slow
def test_submitit_local_jobs_share_one_parent(tmp_path):
    completed = run_cli(
        ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/sweep",
         f"output_root={tmp_path}/outputs", *BASE, "analysis=[conv_kernels]", "seed=0,1"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    _, parents, children = runs_of(tmp_path / "outputs" / "mlflow.db")
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert all(run.info.status == "FINISHED" for run in children)
    hosts = {run.data.tags["vizpipe.host"] for run in children}
    assert len(hosts) == 2, "submitit runs each job in its own process"
    for job in ("0", "1"):
        with h5py.File(tmp_path / "sweep" / job / "results.h5", "r") as handle:
            assert handle["conv_kernels/conv1/weight"].shape == (16, 1, 3, 3)


@pytest.mark.slow
def test_glob_over_experiment_presets(tmp_path):
    completed = run_cli(
        ["-m", "+experiment=glob(*_resnet8,exclude=[am_*,hessian_*,landscape_*])", f"hydra.sweep.dir={tmp_path}/sweep",
         f"output_root={tmp_path}/outputs", "weights.source=random", "progress=false", "figures.enabled=false"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0"]
    with h5py.File(tmp_path / "sweep" / "0" / "results.h5", "r") as handle:
        assert handle["conv_kernels/pre_conv/weight"].shape == (64, 3, 7, 7)
    _, parents, children = runs_of(tmp_path / "outputs" / "mlflow.db")
    assert parents[0].info.run_name == "sweep conv_kernels +experiment=glob(*_resnet8,exclude=[am_*,hessian_*,landscape_*])"
    assert children[0].info.run_name == "conv_kernels +experiment=kernels_resnet8"
