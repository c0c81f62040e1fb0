"""The Hessian analysis through the real `vizpipe` and `vizpipe-figures` commands, HDF5 file and MLflow store."""

import h5py
import mlflow
import numpy as np
import pytest
from conftest import run_cli
from test_cli import BASE, assert_clean_error

SPECTRUM = [
    *BASE,
    "weights.source=random",
    "analysis=[hessian]",
    "analysis.hessian.method=lanczos",
    "analysis.hessian.group_by=module",
    "analysis.hessian.which=extremes",
    "analysis.hessian.max_iterations=40",
    "analysis.hessian.top_k=3",
    "analysis.hessian.eigenvectors=true",
    "analysis.hessian.trace=true",
    "analysis.hessian.trace_max_probes=20",
    "analysis.hessian.trace_relative_standard_error=0.2",
    "analysis.hessian.density=true",
    "analysis.hessian.density_steps=20",
    "analysis.hessian.density_runs=2",
    "evaluation.max_samples=100",
]


# The job takes about a minute on two shared CPU cores, so its tests are slow ones.
@pytest.fixture(scope="module")
def spectrum_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("hessian_job")
    completed = run_cli([f"hydra.run.dir={root}/run", f"output_root={root}/outputs", *SPECTRUM], cwd=root)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root


@pytest.mark.slow
def test_results_hold_blocks_and_whole_model_spectrum(spectrum_job):
    with h5py.File(spectrum_job / "run" / "results.h5", "r") as handle:
        group = handle["hessian"]
        assert [n.decode() for n in group["block_names"][()]] == ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]
        assert group.attrs["group_by"] == "module"
        sizes = group["block_sizes"][()]
        largest, smallest = group["largest"][()], group["smallest"][()]
        top = handle["hessian/top_k/eigenvalues"][()]
        eigenvectors = handle["hessian/top_k/eigenvectors"][()]
        grid, density = handle["hessian/density/grid"][()], handle["hessian/density/density"][()]
        trace = dict(handle["hessian/trace"].attrs)
        samples = handle["hessian/trace/samples"][()]

    assert eigenvectors.shape == (3, sizes.sum())
    assert np.all(np.diff(top) <= 0)
    # Cauchy interlacing: no diagonal block's eigenvalue exceeds the whole Hessian's largest.
    assert largest.max() <= top[0] * (1 + 1e-3)
    assert np.all(smallest <= largest)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-2)
    assert trace["trace"] == pytest.approx(samples.mean())
    assert trace["standard_error"] == pytest.approx(samples.std(ddof=1) / np.sqrt(len(samples)))


@pytest.mark.slow
def test_mlflow_holds_hessian_metrics(spectrum_job):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{spectrum_job / 'outputs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])[0]
    for metric in ("hessian/eigenvalue/conv1", "hessian/smallest_eigenvalue/fc2", "hessian/iterations/fc1",
                   "hessian/top_k/1", "hessian/top_k/3", "hessian/trace", "hessian/trace_standard_error"):
        assert metric in run.data.metrics, metric
    with h5py.File(spectrum_job / "run" / "results.h5", "r") as handle:
        assert run.data.metrics["hessian/top_k/1"] == pytest.approx(float(handle["hessian/top_k/eigenvalues"][0]))


@pytest.mark.slow
def test_hessian_figures_rendered_with_symlog_override(spectrum_job, tmp_path):
    figures = spectrum_job / "run" / "figures"
    for name in ("hessian_eigenvalues.png", "hessian_convergence.png", "hessian_density.png"):
        assert (figures / name).stat().st_size > 1000, name
    drawn = {}
    for symlog in ("true", "false"):
        completed = run_cli([f"source={spectrum_job / 'run'}", f"out_dir={tmp_path / symlog}", "formats=[png]",
                             f"hessian_symlog={symlog}"], cwd=tmp_path, entry="vizpipe-figures")
        assert completed.returncode == 0, completed.stderr
        drawn[symlog] = (tmp_path / symlog / "hessian_eigenvalues.png").read_bytes()
    assert drawn["true"] != drawn["false"], "the symlog option should change the bar chart"


def test_invalid_group_by_rejected_before_work(tmp_path):
    completed = run_cli([f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE,
                         "analysis=[hessian]", "analysis.hessian.group_by=layer"], cwd=tmp_path)
    assert_clean_error(completed, "analysis.hessian.group_by 'layer'", "parameter or module")


def test_power_iteration_top_k_through_cli(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE, "weights.source=random",
         "analysis=[hessian]", "analysis.hessian.blocks=false", "analysis.hessian.top_k=2",
         "analysis.hessian.top_k_method=power_iteration", "analysis.hessian.top_k_tol=1e-4",
         "analysis.hessian.top_k_max_iterations=200", "evaluation.max_samples=50", "tracking.enabled=false"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        group = handle["hessian/top_k"]
        assert group.attrs["method"] == "power_iteration"
        values = group["eigenvalues"][()]
        history = group["history"][()]
    assert values.shape == (2,)
    assert abs(values[0]) >= abs(values[1]) * (1 - 1e-3)
    assert history.shape[1] == 2
    assert history.shape[0] >= 2, "each pair needs at least two products to stop"


def test_unknown_top_k_method_rejected(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", *BASE, "analysis=[hessian]", "analysis.hessian.top_k=2",
         "analysis.hessian.top_k_method=arnoldi"],
        cwd=tmp_path,
    )
    assert_clean_error(completed, "analysis.hessian.top_k_method 'arnoldi'", "lanczos or power_iteration")


def test_verify_stores_both_starts(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", f"output_root={tmp_path}/outputs", *BASE, "weights.source=random",
         "analysis=[hessian]", "analysis.hessian.method=lanczos", "analysis.hessian.verify=true",
         "analysis.hessian.include=[fc1.*,fc2.*]", "evaluation.max_samples=50"],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "results.h5", "r") as handle:
        group = handle["hessian"]
        assert bool(group.attrs["verify"]) is True
        values, by_start = group["eigenvalues"][()], group["eigenvalues_by_start"][()]
        residuals, disagree = group["residuals"][()], group["disagree"][()]
    assert values.shape == disagree.shape == (4,)
    assert by_start.shape == (4, 2)
    kept = np.where(np.abs(by_start[:, 0]) >= np.abs(by_start[:, 1]), by_start[:, 0], by_start[:, 1])
    np.testing.assert_array_equal(values, kept, "the more extreme value is kept")
    assert np.all(np.isfinite(residuals))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("vizpipe").experiment_id])[0]
    assert run.data.metrics["hessian/disagreeing"] == float(disagree.sum())
