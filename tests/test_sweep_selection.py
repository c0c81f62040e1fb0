"""Names of sweep runs, figure labels and job selection, and vizpipe-log's duplicate check, on small real sweeps."""

import json
import shutil
import socket

import mlflow
import pytest
from conftest import run_cli
from omegaconf import OmegaConf

BASE = [
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=20",
    "figures.enabled=false",
    "progress=false",
    "weights.source=random",
]


def runs_of(uri: str, experiment: str = "vizpipe"):
    """Return (parents, children) of an experiment; children in job order."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = sorted(
        (run for run in runs if "mlflow.parentRunId" in run.data.tags),
        key=lambda run: (int(run.data.tags["vizpipe.job_number"]), run.info.start_time),
    )
    return parents, children


def figures(root, out, *overrides):
    return run_cli([f"out_dir={out}", "formats=[png]", "tracking.enabled=false", *overrides], cwd=root,
                   entry="vizpipe-figures")


def figure_sources(out, name):
    return json.loads((out / f"{name}_sources.json").read_text())["sources"]


@pytest.fixture(scope="module")
def preset_sweep(tmp_path_factory):
    """The landscape_resnet8 preset, which sweeps noise_range through hydra.sweeper.params, shrunk to seconds."""
    root = tmp_path_factory.mktemp("preset")
    completed = run_cli(
        ["-m", "+experiment=landscape_resnet8", f"hydra.sweep.dir={root}/sweep", f"output_root={root}/outputs",
         "weights.source=random", "evaluation.max_samples=8", "analysis.landscape.resolution=3",
         "figures.enabled=false", "progress=false"],
        cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root


def test_preset_sweep_names_runs_by_swept_key(preset_sweep):
    parents, children = runs_of(f"sqlite:///{preset_sweep / 'outputs' / 'mlflow.db'}")
    assert [run.info.run_name for run in children] == ["landscape noise_range=1.0", "landscape noise_range=0.1"]
    assert [run.data.params["analysis.landscape.noise_range"] for run in children] == ["1.0", "0.1"]
    assert len(parents) == 1
    assert parents[0].info.run_name == "sweep landscape noise_range=1.0,0.1"
    assert parents[0].data.params["sweep.analysis.landscape.noise_range"] == "1.0,0.1"
    assert parents[0].data.params["sweep.experiment"] == "landscape_resnet8"


def test_figure_labels_preset_jobs_by_override(preset_sweep, tmp_path):
    completed = figures(preset_sweep, tmp_path, "figure=landscapes", f"figure.select.runs_folder={preset_sweep}/sweep")
    assert completed.returncode == 0, completed.stderr[-3000:]
    labels = [source["label"] for source in figure_sources(tmp_path, "landscapes")]
    assert labels == ["noise_range=1.0", "noise_range=0.1"]


def test_figure_selects_jobs_in_given_order(preset_sweep, tmp_path):
    sweep = preset_sweep / "sweep"
    completed = figures(preset_sweep, tmp_path, "figure=landscapes", f"figure.select.runs_folder={sweep}",
                        "figure.select.jobs=[1,0]")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert figure_sources(tmp_path, "landscapes") == [
        {"source": str(sweep / "1" / "results.h5"), "label": "noise_range=0.1"},
        {"source": str(sweep / "0" / "results.h5"), "label": "noise_range=1.0"},
    ]


@pytest.mark.parametrize("where", [
    "figure.select.where={analysis.landscape.noise_range:0.1}",
    "+figure.select.where.analysis.landscape.noise_range=0.1",
])
def test_figure_selects_jobs_by_config_value(preset_sweep, tmp_path, where):
    sweep = preset_sweep / "sweep"
    completed = figures(preset_sweep, tmp_path, "figure=landscapes", f"figure.select.runs_folder={sweep}", where)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # With one job selected, no override differs between jobs, so the job number labels it.
    assert figure_sources(tmp_path, "landscapes") == [{"source": str(sweep / "1" / "results.h5"), "label": "job 1"}]


def test_figure_where_without_match_lists_values(preset_sweep, tmp_path):
    sweep = preset_sweep / "sweep"
    completed = figures(preset_sweep, tmp_path, "figure=landscapes", f"figure.select.runs_folder={sweep}",
                        "figure.select.where={analysis.landscape.noise_range:0.5}")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"vizpipe: error: figure.select.where {{'analysis.landscape.noise_range': 0.5}} matches none of jobs [0, 1] "
        f"in {sweep}; their values: analysis.landscape.noise_range = 1.0 (job 0), 0.1 (job 1)"
    )


def test_figure_jobs_not_in_folder_rejected(preset_sweep, tmp_path):
    sweep = preset_sweep / "sweep"
    completed = figures(preset_sweep, tmp_path, "figure=landscapes", f"figure.select.runs_folder={sweep}",
                        "figure.select.jobs=[0,5]")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        f"vizpipe: error: figure.select.jobs [5] not found in {sweep}: the jobs with a results.h5 are [0, 1]"
    )


def test_figure_jobs_with_mlflow_query_rejected(tmp_path):
    completed = figures(tmp_path, tmp_path, "figure=landscapes_mlflow", "figure.select.jobs=[0]")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "vizpipe: error: figure.select.jobs and figure.select.where pick jobs of a runs_folder; "
        "for an MLflow experiment narrow figure.select.filter_string instead"
    )


PRESETS = {
    "tiny_hessian": "defaults:\n  - override /analysis: [hessian]\nanalysis:\n  hessian:\n    max_iterations: 2\n",
    "tiny_kernels": "defaults:\n  - override /analysis: [conv_kernels]\n",
}


@pytest.fixture(scope="module")
def glob_sweep(tmp_path_factory):
    """A glob over two presets of a user's config folder: job 0 runs hessian, job 1 conv_kernels."""
    root = tmp_path_factory.mktemp("glob")
    (root / "conf" / "experiment").mkdir(parents=True)
    for name, body in PRESETS.items():
        (root / "conf" / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n{body}")
    completed = run_cli(
        # --config-dir, because a glob lists the options of the search path at start-up, not of hydra.searchpath.
        ["-m", "--config-dir", str(root / "conf"), "+experiment=glob(tiny_*)", f"hydra.sweep.dir={root}/sweep",
         f"output_root={root}/outputs", *BASE],
        cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root


def test_glob_parent_named_by_all_analyses(glob_sweep):
    parents, children = runs_of(f"sqlite:///{glob_sweep / 'outputs' / 'mlflow.db'}")
    assert [run.info.run_name for run in children] == [
        "hessian +experiment=tiny_hessian", "conv_kernels +experiment=tiny_kernels",
    ]
    assert len(parents) == 1
    assert parents[0].info.run_name == "sweep conv_kernels+hessian +experiment=glob(tiny_*)"
    state = json.loads((glob_sweep / "sweep" / "mlflow_sweep.json").read_text())
    assert state["analyses"] == ["conv_kernels", "hessian"]


def test_figure_error_names_jobs_to_select(glob_sweep, tmp_path):
    sweep = glob_sweep / "sweep"
    completed = figures(glob_sweep, tmp_path, "figure=kernels", f"figure.select.runs_folder={sweep}")
    assert completed.returncode == 2
    assert completed.stderr.strip() == (
        "vizpipe: error: figure 'kernels' needs the conv_kernels analysis, but these selected jobs have none: job 0; "
        "narrow figure.select to the jobs that ran it: figure.select.jobs=[1]"
    )
    completed = figures(glob_sweep, tmp_path, "figure=kernels", f"figure.select.runs_folder={sweep}",
                        "figure.select.jobs=[1]")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [s["source"] for s in figure_sources(tmp_path, "kernels")] == [str(sweep / "1" / "results.h5")]


@pytest.fixture(scope="module")
def model_sweep(tmp_path_factory):
    """Hessian spectra of two models, tracked in the sweep's own SQLite store."""
    root = tmp_path_factory.mktemp("models")
    completed = run_cli(
        ["-m", f"hydra.sweep.dir={root}/sweep", f"output_root={root}/outputs", *BASE, "analysis=[hessian]",
         "analysis.hessian.max_iterations=2", "model=small_cnn,mlp"],
        cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root


def test_eigenvalue_labels_name_swept_models(model_sweep, tmp_path):
    completed = figures(model_sweep, tmp_path, "figure=eigenvalues", f"figure.select.runs_folder={model_sweep}/sweep")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [s["label"] for s in figure_sources(tmp_path, "eigenvalues")] == ["model=small_cnn", "model=mlp"]


def test_figure_label_key_still_used(model_sweep, tmp_path):
    completed = figures(model_sweep, tmp_path, "figure=eigenvalues", f"figure.select.runs_folder={model_sweep}/sweep",
                        "figure.label=seed")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert [s["label"] for s in figure_sources(tmp_path, "eigenvalues")] == ["seed=0", "seed=0"]


def test_mlflow_selected_runs_labelled_by_override(model_sweep, tmp_path):
    store = f"sqlite:///{model_sweep / 'outputs' / 'mlflow.db'}"
    _, children = runs_of(store)
    completed = figures(
        model_sweep, tmp_path, "figure=eigenvalues", "figure.select.experiment_name=vizpipe",
        f"figure.select.tracking_uri={store}", "figure.select.filter_string=\"attributes.status = 'FINISHED'\"",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert figure_sources(tmp_path, "eigenvalues") == [
        {"source": children[0].info.run_id, "label": "model=small_cnn"},
        {"source": children[1].info.run_id, "label": "model=mlp"},
    ]


def test_log_later_skips_jobs_with_own_run(model_sweep):
    store = f"sqlite:///{model_sweep / 'outputs' / 'mlflow.db'}"
    completed = run_cli([str(model_sweep / "sweep")], cwd=model_sweep, entry="vizpipe-log")
    assert completed.returncode == 0, completed.stderr[-3000:]
    _, children = runs_of(store)
    for job, run in zip(("0", "1"), children):
        assert (
            f"{model_sweep / 'sweep' / job}: skipped, already logged as mlflow run {run.info.run_id}" in completed.stdout
        )
    parents, children = runs_of(store)
    assert (len(parents), len(children)) == (1, 2)


@pytest.mark.slow  # three vizpipe-log processes: about 25 s on 2 shared cores
def test_log_later_twice_logs_once_unless_forced(model_sweep, tmp_path):
    store = f"sqlite:///{tmp_path / 'later.db'}"
    logged = [
        run_cli([str(model_sweep / "sweep"), "--tracking-uri", store, *extra], cwd=tmp_path, entry="vizpipe-log")
        for extra in ([], [], ["--force"])
    ]
    assert [completed.returncode for completed in logged] == [0, 0, 0], logged[-1].stderr[-3000:]
    assert "skipped" not in logged[0].stdout
    assert logged[1].stdout.count(": skipped, already logged as mlflow run ") == 2
    assert "skipped" not in logged[2].stdout
    parents, children = runs_of(store)
    assert len(parents) == 1
    assert parents[0].info.run_name == "sweep hessian model=small_cnn,mlp"
    assert [run.info.run_name for run in children] == ["hessian model=small_cnn"] * 2 + ["hessian model=mlp"] * 2
    assert all(run.data.tags["vizpipe.logged_later"] == "true" for run in children)


def test_log_later_unreachable_store_hint(model_sweep, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    run_dir = tmp_path / "job"
    shutil.copytree(model_sweep / "sweep" / "0", run_dir)
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    config.tracking.tracking_uri = dead
    OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")

    completed = run_cli([str(run_dir)], cwd=tmp_path, entry="vizpipe-log",
                        env_extra={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert completed.returncode == 1
    assert f"MLflow connect failed at {dead}" in completed.stderr
    assert (
        f"{run_dir} is not logged; the job's own tracking store is unreachable, "
        "so pass --tracking-uri with a store that is reachable"
    ) in completed.stderr
    assert "log it later" not in completed.stderr + completed.stdout
