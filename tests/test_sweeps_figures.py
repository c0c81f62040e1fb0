"""Paper figures from a real checkpoint sweep: selection by folder and by MLflow query, layouts, determinism."""

import json

import h5py
import mlflow
import numpy as np
import pytest
import torch
from conftest import run_cli

from vizpipe.models import SmallCNN

# A two-job sweep with all four analyses, then nine vizpipe-figures runs: minutes on 2 cores.
pytestmark = pytest.mark.slow

SWEEP = [
    "dataset.image_shape=[1,8,8]",
    "evaluation.max_samples=100",
    "figures.enabled=false",
    "progress=false",
    "weights.source=checkpoint",
    "analysis.landscape.resolution=5",
    "analysis.hessian.max_iterations=5",
    "analysis.activation_maximization.iterations=5",
    "analysis.activation_maximization.channels=[0,1,2,3]",
]


@pytest.fixture(scope="module")
def checkpoint_sweep(tmp_path_factory):
    """All four analyses on two random SmallCNN checkpoints, as one multirun."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(root / f"seed{seed}.pt")
        torch.save(SmallCNN(input_channel=1, class_number=10).state_dict(), paths[-1])
    completed = run_cli(
        ["-m", f"hydra.sweep.dir={root}/sweep", f"output_root={root}/outputs", *SWEEP,
         f"weights.checkpoint={paths[0]},{paths[1]}"],
        cwd=root,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root


def figures(root, out, *overrides):
    return run_cli(
        [f"out_dir={out}", "formats=[png,pdf]", f"tracking.tracking_uri=sqlite:///{out}.db", *overrides],
        cwd=root, entry="vizpipe-figures",
    )


def test_landscapes_from_runs_folder(checkpoint_sweep, tmp_path):
    root = checkpoint_sweep
    completed = figures(root, tmp_path, "figure=landscapes", f"figure.select.runs_folder={root}/sweep",
                        "figure.label=weights.checkpoint")
    assert completed.returncode == 0, completed.stderr[-3000:]
    sources = json.loads((tmp_path / "landscapes_sources.json").read_text())
    assert [s["label"] for s in sources["sources"]] == ["checkpoint=seed1.pt", "checkpoint=seed2.pt"]
    pdf = (tmp_path / "landscapes.pdf").read_bytes()
    assert b"/Subtype /Image" not in pdf, "contour panels stay vector graphics"
    assert (tmp_path / "landscapes.png").stat().st_size > 10_000


def test_shared_scale_spans_all_jobs(checkpoint_sweep):
    from vizpipe.config import FigureSpecConfig, PrintStyleConfig
    from vizpipe.render.paper import load_panels, render_paper_figure
    from omegaconf import OmegaConf

    root = checkpoint_sweep
    sources = [(str(job), root / "sweep" / job / "results.h5", job) for job in ("0", "1")]
    spec = OmegaConf.structured(FigureSpecConfig(kind="landscapes", name="shared", label="weights.checkpoint"))
    style = OmegaConf.structured(PrintStyleConfig())
    figure = render_paper_figure(load_panels(sources, spec.label), spec, style, root / "direct", ["png"])
    losses = []
    for job in ("0", "1"):
        with h5py.File(root / "sweep" / job / "results.h5", "r") as handle:
            losses.append(handle["landscape/loss"][()])
    assert figure.color_limits == (float(min(l.min() for l in losses)), float(max(l.max() for l in losses)))


def test_eigenvalue_comparison_matches_results(checkpoint_sweep, tmp_path):
    from vizpipe.config import FigureSpecConfig, PrintStyleConfig
    from vizpipe.render.paper import load_panels, render_paper_figure
    from omegaconf import OmegaConf

    root = checkpoint_sweep
    sources = [(job, root / "sweep" / job / "results.h5", job) for job in ("0", "1")]
    spec = OmegaConf.structured(FigureSpecConfig(kind="eigenvalues", name="eig", label="weights.checkpoint"))
    figure = render_paper_figure(load_panels(sources, spec.label), spec, OmegaConf.structured(PrintStyleConfig()), tmp_path, ["pdf"])
    for row, job in enumerate(("0", "1")):
        with h5py.File(root / "sweep" / job / "results.h5", "r") as handle:
            names = [n.decode() for n in handle["hessian/parameter_names"][()]]
            values = handle["hessian/eigenvalues"][()]
        assert figure.details["parameter_names"] == names
        np.testing.assert_array_equal(figure.details["eigenvalues"][row], values)
    assert not np.array_equal(figure.details["eigenvalues"][0], figure.details["eigenvalues"][1])


@pytest.mark.parametrize("spec", ["landscapes", "eigenvalues", "am_tv_weights", "kernels"])
def test_figure_specs_render_byte_identical(checkpoint_sweep, tmp_path, spec):
    root = checkpoint_sweep
    outputs = []
    for name in ("first", "second"):
        completed = figures(root, tmp_path / name, f"figure={spec}", f"figure.select.runs_folder={root}/sweep",
                            "tracking.enabled=false")
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs.append(tmp_path / name)
    written = sorted(p.name for p in outputs[0].iterdir())
    assert written == sorted([f"{spec}.png", f"{spec}.pdf", f"{spec}_sources.json"])
    for name in written:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    # The spec names no label key, so the swept override labels each job.
    sources = json.loads((outputs[0] / f"{spec}_sources.json").read_text())["sources"]
    assert [s["label"] for s in sources] == ["checkpoint=seed1.pt", "checkpoint=seed2.pt"]


def test_mlflow_query_selects_and_logs_figures_run(checkpoint_sweep, tmp_path):
    root = checkpoint_sweep
    store = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("vizpipe").experiment_id
    expected_runs = client.search_runs([experiment], filter_string="params.`weights.checkpoint` LIKE '%seed2.pt'")
    assert len(expected_runs) == 1
    completed = figures(
        root, tmp_path, "figure=landscapes_mlflow", f"figure.select.tracking_uri={store}",
        'figure.select.filter_string="params.`weights.checkpoint` LIKE \'%seed2.pt\'"', "figure.label=weights.checkpoint",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    sources = json.loads((tmp_path / "landscapes_mlflow_sources.json").read_text())
    assert sources["sources"] == [{"source": expected_runs[0].info.run_id, "label": "checkpoint=seed2.pt"}]

    figures_client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}.db")
    runs = figures_client.search_runs([figures_client.get_experiment_by_name("vizpipe-figures").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["vizpipe.source_runs"] == expected_runs[0].info.run_id
    assert run.data.params["figure.kind"] == "landscapes"
    artifacts = {a.path for a in figures_client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/landscapes_mlflow.png", "figures/landscapes_mlflow.pdf"}


def test_figure_without_selection_is_rejected(checkpoint_sweep, tmp_path):
    completed = figures(checkpoint_sweep, tmp_path, "figure=kernels")
    assert completed.returncode == 2
    assert "figure.select needs exactly one of runs_folder=<multirun folder> or experiment_name=" in completed.stderr
