"""Activation maximization through the real CLI: config keys, results.h5, figures, MLflow."""

import h5py
import mlflow
import pytest
from conftest import run_cli
from PIL import Image

from vizpipe.errors import VizpipeError
from vizpipe.runner import parse_channels

AM = "analysis.activation_maximization"


def test_channel_range_parsing():
    assert parse_channels("all") is None
    assert parse_channels(3) == [3]
    assert parse_channels([0, 5]) == [0, 5]
    assert parse_channels("0:4") == [0, 1, 2, 3]
    assert parse_channels("2:9:3") == [2, 5, 8]
    for bad in ("4:2", "a:3", "0:4:0", "-1:3", "1.5"):
        with pytest.raises(VizpipeError, match="start:stop"):
            parse_channels(bad)


def test_sweep_writes_results_figures_and_metrics(tmp_path):
    completed = run_cli(
        [
            "-m", f"hydra.sweep.dir={tmp_path}/sweep", f"output_root={tmp_path}/outputs",
            "weights.source=random", "dataset.image_shape=[1,8,8]", "evaluation.max_samples=50",
            "figures.formats=[png]", "progress=false", "analysis=[activation_maximization]",
            f"{AM}.layers=all_conv", f"{AM}.channels=0:3", f"{AM}.iterations=6", f"{AM}.frame_every=2",
            f"{AM}.images_per_channel=2", f"{AM}.diversity_weight=0.5", f"{AM}.parameterization=fourier",
            f"{AM}.jitter=1", f"{AM}.tv_weight=0,1",
        ],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    for job, tv_weight in ((0, 0.0), (1, 1.0)):
        run = tmp_path / "sweep" / str(job)
        with h5py.File(run / "results.h5", "r") as handle:
            assert sorted(handle["activation_maximization"]) == ["conv1", "conv2"]
            group = handle["activation_maximization/conv2"]
            assert group["channels"][()].tolist() == [0, 0, 1, 1, 2, 2]
            assert group["images"].shape == (6, 1, 8, 8)
            assert group["display_images"].shape == (6, 1, 8, 8)
            assert group["history"].shape == (7, 6)
            assert group["frames"].shape == (4, 6, 1, 8, 8)
            assert group["frame_iterations"][()].tolist() == [0, 2, 4, 6]
            assert group.attrs["tv_weight"] == tv_weight
            assert group.attrs["parameterization"] == "fourier"
            assert group.attrs["images_per_channel"] == 2
            final = group["activations"][()]

        figures = run / "figures"
        assert (figures / "activation_maximization_conv2.png").is_file()
        assert (figures / "activation_curves_conv2.png").is_file()
        with Image.open(figures / "activation_maximization_conv2.gif") as gif:
            assert gif.n_frames == 4
        for channel in range(3):
            with Image.open(figures / f"conv2_{channel}.gif") as gif:
                assert gif.n_frames == 4
            with Image.open(figures / f"conv2_{channel}_final.png") as png:
                assert png.width > png.height  # the channel's two images side by side
        assert not (figures / "conv2_3.gif").exists()

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
        runs = client.search_runs(
            [client.get_experiment_by_name("vizpipe").experiment_id],
            filter_string=f"params.`{AM}.tv_weight` = '{tv_weight}'",
        )
        assert len(runs) == 1
        metrics = runs[0].data.metrics
        for channel in range(3):
            expected = final[2 * channel : 2 * channel + 2].mean()
            assert metrics[f"activation_maximization/conv2/final_activation/{channel}"] == pytest.approx(expected)
        assert metrics["activation_maximization/conv2/mean_final_activation"] == pytest.approx(final.mean())
        artifacts = [item.path for item in client.list_artifacts(runs[0].info.run_id, "figures")]
        assert "figures/activation_maximization_conv2.png" in artifacts


def test_bad_options_fail_before_work(tmp_path):
    completed = run_cli(
        [f"hydra.run.dir={tmp_path}/run", "tracking.enabled=false", "weights.source=random",
         "dataset.image_shape=[1,8,8]", "analysis=[activation_maximization]", f"{AM}.channels=0:99"],
        cwd=tmp_path,
    )
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("vizpipe: error:")]
    assert len(errors) == 1, completed.stderr
    assert "out of range for layer 'conv1'" in errors[0]
    assert f"fix {AM}.channels" in errors[0]
    assert not (tmp_path / "run" / "results.h5").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("scale=[1.2,1.0]", "scale"),
        ("norm_crop=100", "norm_crop"),
        ("objective=unit", "objective"),
        ("layers=conv1", "layers"),
        ("position=[1]", "position"),
    ],
)
def test_invalid_options_rejected_by_validate(override, fragment):
    from hydra import compose, initialize_config_module

    from vizpipe.config import register_configs
    from vizpipe.runner import validate

    register_configs()
    with initialize_config_module(config_module="vizpipe.conf", version_base="1.3"):
        cfg = compose("config", overrides=["analysis=[activation_maximization]", f"{AM}.{override}"])
    with pytest.raises(VizpipeError, match=fragment):
        validate(cfg)
