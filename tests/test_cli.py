"""End-to-end runs of the real console scripts on digits, with a real MLflow SQLite store."""

import pickle

import h5py
import mlflow
import numpy as np
import pytest
import torch
from conftest import run_cli

from vizpipe.data import digits
from vizpipe.models import SmallCNN
from vizpipe.overrides import check_overrides

BASE = [
    "weights.epochs=1",
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=200",
    "figures.formats=[png]",
    "progress=false",
]
FAST = [
    *BASE,
    "analysis.landscape.resolution=5",
    "analysis.landscape.max_samples=100",
    "analysis.hessian.max_iterations=10",
    "analysis.activation_maximization.iterations=10",
]


def assert_clean_error(completed, *fragments):
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr, completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if line.startswith("vizpipe: error:")]
    assert len(error_lines) == 1, completed.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


@pytest.fixture(scope="module")
def default_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    completed = run_cli([f"hydra.run.dir={root}/run", f"output_root={root}/outputs", *FAST], cwd=root)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root, completed


def test_results_file_holds_documented_datasets(default_job):
    root, completed = default_job
    path = root / "run" / "results.h5"
    assert f"results: {path}" in completed.stdout
    model = SmallCNN(input_channel=1, class_number=10)
    names = [name for name, _ in model.named_parameters()]
    with h5py.File(path, "r") as handle:
        for key in ("schema_version", "vizpipe_version", "torch_version", "config_yaml", "weight_fingerprint"):
            assert key in handle.attrs, key
        assert handle["landscape/loss"].shape == (5, 5)
        assert handle["landscape/accuracy"].shape == (5, 5)
        assert handle["landscape/x"][()].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
        assert handle["landscape/y"].shape == (5,)
        assert [n.decode() for n in handle["hessian/parameter_names"][()]] == names
        assert handle["hessian/eigenvalues"].shape == (len(names),)
        assert handle["activation_maximization/conv1/images"].shape == (16, 1, 8, 8)
        assert handle["activation_maximization/conv2/activations"].shape == (32,)
        assert handle["conv_kernels/conv1/weight"].shape == (16, 1, 3, 3)
        assert handle["training/test_accuracy"].shape == (1,)
        center = handle["landscape/loss"][2, 2]

    # The stored center equals the test loss of the saved checkpoint, computed here from scratch.
    model.load_state_dict(torch.load(root / "run" / "checkpoint.pt", weights_only=True))
    model.eval()
    dataset = digits(image_shape=[1, 8, 8])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(dataset.x_test[:100]), dataset.y_test[:100])
    assert center == pytest.approx(float(loss), rel=1e-5)


def test_mlflow_store_holds_the_run(default_job):
    root, _ = default_job
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vizpipe")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["analysis.landscape.resolution"] == "5"
    assert run.data.params["model._target_"] == "vizpipe.models.SmallCNN"
    for metric in ("hessian/eigenvalue/conv1.weight", "landscape/center_loss", "test/accuracy",
                   "activation_maximization/conv2/mean_final_activation"):
        assert metric in run.data.metrics, metric
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"results.h5", "figures", ".hydra"} <= artifacts
    figures = {item.path for item in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/landscape_contour.png" in figures


def test_figures_written_and_rerendered_identically(default_job, tmp_path):
    root, _ = default_job
    figures = root / "run" / "figures"
    for name in ("landscape_contour.png", "landscape_surface.png", "hessian_eigenvalues.png",
                 "conv_kernels_conv1.png", "activation_maximization_conv2.png", "activation_maximization_conv2.gif"):
        assert (figures / name).stat().st_size > 1000, name

    first = run_cli([f"source={root / 'run'}", f"out_dir={tmp_path / 'a'}", "formats=[png,pdf]"], cwd=tmp_path, entry="vizpipe-figures")
    second = run_cli([f"source={root / 'run' / 'results.h5'}", f"out_dir={tmp_path / 'b'}", "formats=[png,pdf]"], cwd=tmp_path, entry="vizpipe-figures")
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    written = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "landscape_contour.pdf" in written
    for name in written:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_multirun_over_noise_ranges_gives_two_runs(tmp_path):
    completed = run_cli(
        ["-m", f"hydra.sweep.dir={tmp_path}/sweep", f"output_root={tmp_path}/outputs", *BASE,
         "weights.source=random", "analysis=[landscape]", "analysis.landscape.resolution=3",
         "analysis.landscape.noise_range=1.0,0.1"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranges = []
    for job in ("0", "1"):
        with h5py.File(tmp_path / "sweep" / job / "results.h5", "r") as handle:
            ranges.append(float(np.max(handle["landscape/x"][()])))
    assert ranges == [1.0, 0.1]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]  # the sweep's parent run has no config
    assert sorted(r.data.params["analysis.landscape.noise_range"] for r in runs) == ["0.1", "1.0"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_unknown_layer_lists_valid_names(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "analysis=[activation_maximization]", "analysis.activation_maximization.layers=[conv3]"],
        cwd=tmp_path,
    )
    assert_clean_error(completed, "unknown layer 'conv3'", "Closest valid names:", "conv1", "conv2")


def test_channel_out_of_range(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "analysis=[activation_maximization]", "analysis.activation_maximization.layers=[conv1]",
         "analysis.activation_maximization.channels=[3,16]"],
        cwd=tmp_path,
    )
    assert_clean_error(
        completed, "[16] out of range", "'conv1'", "16 channels", "fix analysis.activation_maximization.channels"
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists(), "the check must come before training"


def test_missing_cifar_folder(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", "dataset=cifar10",
         f"dataset.data_path={tmp_path}/no_such_folder", "analysis=[conv_kernels]"],
        cwd=tmp_path,
    )
    assert_clean_error(completed, "CIFAR-10 folder not found", "no_such_folder", "dataset.data_path")


def test_checkpoint_with_wrong_keys(tmp_path):
    checkpoint = tmp_path / "renamed.pt"
    state = SmallCNN(input_channel=1, class_number=10).state_dict()
    state = {key.replace("fc2.", "classifier."): value for key, value in state.items()}
    torch.save(state, checkpoint)
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "weights.source=checkpoint", f"weights.checkpoint={checkpoint}", "analysis=[conv_kernels]"],
        cwd=tmp_path,
    )
    assert_clean_error(
        completed, "does not fit SmallCNN", "missing keys: fc2.bias, fc2.weight", "unexpected keys: classifier.bias",
        "check that the model config matches the checkpoint",
    )
    assert not (tmp_path / "run" / "results.h5").exists()


def test_checkpoint_with_pickled_code_rejected(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    checkpoint = tmp_path / "evil.pt"
    with open(checkpoint, "wb") as handle:
        pickle.dump({"conv1.weight": Payload()}, handle)
    torch.save({"weights": Payload()}, checkpoint)
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "weights.source=checkpoint", f"weights.checkpoint={checkpoint}", "analysis=[conv_kernels]"],
        cwd=tmp_path,
    )
    assert_clean_error(
        completed, f"checkpoint {checkpoint} was rejected by weights_only loading",
        "Save only the weights with torch.save(model.state_dict(), path)",
    )
    assert "code ran" not in completed.stdout


def test_unreachable_tracking_server_keeps_results(tmp_path):
    import socket

    with socket.socket() as probe:  # a free port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE, "weights.source=random",
         "analysis=[hessian]", "analysis.hessian.max_iterations=3", f"tracking.tracking_uri=http://127.0.0.1:{port}"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "MLflow start_run failed" in completed.stdout + completed.stderr
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        assert handle["hessian/eigenvalues"].shape == (12,)
    assert (tmp_path / "run" / "figures" / "hessian_eigenvalues.png").exists()


@pytest.mark.slow
def test_default_job_as_in_make_demo(tmp_path):
    completed = run_cli([f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        assert handle["training/test_accuracy"][-1] > 0.9
        loss = handle["landscape/loss"][()]
        center = loss[loss.shape[0] // 2, loss.shape[1] // 2]
        assert center == loss.min(), "a trained model sits at the bottom of its landscape"
        for layer in ("conv1", "conv2"):
            activations = handle[f"activation_maximization/{layer}/activations"][()]
            start = handle[f"activation_maximization/{layer}/start_activations"][()]
            assert (activations > start).all()


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["kernels_resnet8", "hessian_resnet8"])
def test_resnet8_presets_run_on_digits(tmp_path, experiment):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", f"+experiment={experiment}",
         "weights.epochs=1", "progress=false", "figures.formats=[png]"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        if experiment == "kernels_resnet8":
            assert handle["conv_kernels/pre_conv/weight"].shape == (64, 3, 7, 7)
        else:
            assert handle["hessian/eigenvalues"].shape == (29,)
            assert handle["hessian/converged"][()].all()
            assert handle["hessian"].attrs["verify"]
            assert handle["hessian/eigenvalues_by_start"].shape == (29, 2)


def test_added_key_with_typo_rejected(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "analysis=[landscape]", "+analysis.landscape.resolutoin=5"],
        cwd=tmp_path,
    )
    assert_clean_error(completed, "unknown config key 'analysis.landscape.resolutoin'", "resolution")


@pytest.mark.parametrize("override, fragments", [
    ("analysis.landscape.resolutoin=5", ["unknown config key 'analysis.landscape.resolutoin'", "resolution"]),
    ("sed=3", ["unknown config key 'sed'", "Closest valid names: seed"]),
    ("model=resnet9", ["unknown model 'resnet9'", "resnet8", "vizpipe --help"]),
    ("analysis=[landscpe]", ["unknown analysis 'landscpe'", "Closest valid names: landscape."]),
    ("+experiment=landscape_resnt8", ["unknown experiment 'landscape_resnt8'", "landscape_resnet8"]),
    ("analysis.landscape.resolution=many", ["invalid analysis.landscape.resolution 'many': expected an integer"]),
    ("analysis.hessian.method=null", ["invalid analysis.hessian.method 'null': expected a string"]),
    ("model=null", ["invalid model 'null': choose from", "small_cnn"]),
    ("analysis=[landscape,null]", ["invalid analysis 'null': choose from", "hessian"]),
])
def test_misspelt_override_rejected_before_hydra(tmp_path, override, fragments):
    completed = run_cli([f"hydra.run.dir={tmp_path}/run", override], cwd=tmp_path)
    assert completed.returncode == 2
    assert_clean_error(completed, *fragments)
    assert not (tmp_path / "run").exists(), "nothing runs before the check"


@pytest.mark.parametrize("override, message", [
    ("analysis.hessian.tol=abc", "invalid analysis.hessian.tol 'abc': expected a number"),
    ("analysis.hessian.max_iterations=1.5", "invalid analysis.hessian.max_iterations '1.5': expected an integer"),
    ("analysis.hessian.method=[lanczos]", "invalid analysis.hessian.method '[lanczos]': expected a string"),
    ("progress=maybe", "invalid progress 'maybe': expected true or false"),
    ("analysis.hessian.tol=1e-3", None),
    ("analysis.hessian.max_iterations=5,10", None),  # a sweep: each job's value is checked by Hydra
    ("analysis.landscape.y_range=[0,1]", None),
    ("analysis.landscape.y_range=null", None),  # an Optional field
    ("analysis.landscape.resolution=${seed}", None),  # an interpolation
    ("model.width=abc", None),  # a plug-in node: its keys depend on the model
    ("model='mlp'", None),  # Hydra unquotes group options
    ("+experiment=\"landscape_resnet8\"", None),
    ("analysis=['landscape','hessian']", None),
    ("analysis=[landscape],[hessian]", None),  # a sweep over two selections
    ("analysis=[landscape,hessian],[conv_kernels]", None),
    ("model=mlp,'small_cnn'", None),
    ("analysis=[landscape,'hessian'],['conv_kernels']", None),
    ("analysis=[landscape],[hesian]",
     "unknown analysis 'hesian'. Closest valid names: hessian. Run vizpipe --help to list every option"),
    ("model='resnet9'", "unknown model 'resnet9'. Closest valid names: resnet8, resnet6, resnet4, resnet50, resnet34. "
     "Run vizpipe --help to list every option"),
])
def test_override_types_checked(override, message):
    assert check_overrides([override]) == message


def test_quoted_analysis_selection_accepted(tmp_path):
    completed = run_cli(["analysis=['landscape']", "analysis.landscape.dims=1", "--cfg", "job"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "dims: 1" in completed.stdout


def test_own_config_dir_preset_accepted(tmp_path):
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nanalysis:\n  conv_kernels:\n    normalize: grid\n"
    )
    completed = run_cli(
        ["--config-dir", str(tmp_path / "configs"), "+experiment=mine", f"hydra.run.dir={tmp_path}/run", *BASE,
         "weights.source=random", "analysis=[conv_kernels]", "tracking.enabled=false", "figures.enabled=false"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        assert handle["conv_kernels/conv1"].attrs["normalize"] == "grid"


def test_own_analysis_option_overridden(tmp_path):
    (tmp_path / "configs" / "analysis").mkdir(parents=True)
    (tmp_path / "configs" / "analysis" / "quick_landscape.yaml").write_text(
        "# @package analysis.landscape\nresolution: 5\n"
    )
    completed = run_cli(
        ["--config-dir", str(tmp_path / "configs"), "analysis=[quick_landscape]", "analysis.landscape.dims=1",
         "--cfg", "job"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "dims: 1" in completed.stdout
    assert "resolution: 5" in completed.stdout


def test_override_of_unselected_analysis(tmp_path):
    completed = run_cli(["analysis=[landscape]", "analysis.hessian.method=lanczos"], cwd=tmp_path)
    assert_clean_error(completed, "analysis.hessian.method is set", "analysis=[landscape,hessian]")


def test_hessian_include_checked_before_training(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
         "analysis=[hessian]", "analysis.hessian.include=[conv9.weight]"],
        cwd=tmp_path,
    )
    assert_clean_error(completed, "'conv9.weight'", "conv1.weight")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
