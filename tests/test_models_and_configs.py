import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

import vizpipe
from vizpipe.analyses.modules import conv_layer_names
from vizpipe.config import register_configs
from vizpipe.errors import VizpipeError
from vizpipe.models import (
    MLP,
    cifar_resnet20,
    resnet4,
    resnet6,
    resnet8,
    resnet10,
    resnet18,
    resnet34,
    resnet50,
)
from vizpipe.runner import validate

register_configs()
EXPERIMENTS = sorted(p.stem for p in (Path(vizpipe.__file__).parent / "conf" / "experiment").glob("*.yaml"))


def test_resnet8_module_names_match_reference():
    model = resnet8(input_channel=3, class_number=10)
    names = [name for name, _ in model.named_parameters()]
    assert len(names) == 29
    assert names[:3] == ["pre_conv.weight", "pre_bn.weight", "pre_bn.bias"]
    assert "layers.1.0.downsample.0.weight" in names
    assert "layers.0.0.downsample.0.weight" not in names
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert model.pre_conv.kernel_size == (7, 7)
    assert model.pre_conv.stride == (2, 2)
    assert conv_layer_names(model)[:3] == ["pre_conv", "layers.0.0.conv1", "layers.0.0.conv2"]


@pytest.mark.parametrize("factory, stages", [(resnet4, 1), (resnet6, 2), (resnet8, 3), (resnet10, 4), (resnet18, 4), (resnet34, 4), (resnet50, 4)])
def test_resnet_family_runs(factory, stages):
    model = factory(input_channel=1, class_number=7).eval()
    assert len(model.layers) == stages
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_cifar_resnet20_and_mlp():
    model = cifar_resnet20(3, 10)
    convs = conv_layer_names(model)
    assert sum(1 for n in convs if "shortcut" not in n and "downsample" not in n) == 19  # 19 conv + 1 fc = 20 layers
    assert [m.out_channels for n, m in model.named_modules() if n.endswith("layer3.0.conv1")] == [64]
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert MLP([1, 8, 8], 10, [32, 16])(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_presets_compose_and_build(experiment):
    with initialize_config_module("vizpipe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"])
    validate(cfg)
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    if experiment.endswith("resnet8"):
        assert list(cfg.dataset.image_shape) == [3, 32, 32]
    am = cfg.analysis.activation_maximization
    if am is not None:
        names = dict(model.named_modules())
        assert all(layer in names for layer in am.layers)


def test_presets_exist():
    assert {"am_resnet8", "kernels_resnet8", "hessian_resnet8", "landscape_resnet8"} <= set(EXPERIMENTS)


@pytest.mark.parametrize(
    "override, message",
    [
        ("analysis.landscape.resolution=0", "resolution"),
        ("analysis.landscape.noise_range=[1,-1]", "the minimum 1 must be below the maximum -1"),
        ("analysis.landscape.y_range=[0,0]", "y_range"),
        ("analysis.landscape.dims=3", "dims 3"),
        ("analysis.landscape.direction=target", "needs 2 file(s) in analysis.landscape.targets"),
        ("analysis.landscape.direction=pca", "trajectory"),
        ("analysis.landscape.direction=eigen", "direction 'eigen'"),
        ("analysis.landscape.noise_range=-2", "must be positive"),
        ("analysis.hessian.max_iterations=0", "max_iterations"),
        ("analysis.activation_maximization.iterations=0", "iterations"),
        ("analysis.activation_maximization.channels=abc", "channels"),
        ("weights.source=pretrained", "weights.source"),
        ("weights.source=checkpoint", "weights.checkpoint"),
    ],
)
def test_validate_rejects_bad_values(override, message):
    with initialize_config_module("vizpipe.conf", version_base="1.3"):
        cfg = compose("config", overrides=[override])
    with pytest.raises(VizpipeError, match=re.escape(message)):
        validate(cfg)


def test_schema_rejects_unknown_key_and_wrong_type():
    from hydra.errors import ConfigCompositionException

    with initialize_config_module("vizpipe.conf", version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["analysis.landscape.resolutoin=5"])
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["analysis.landscape.resolution=many"])
        cfg = compose("config", overrides=["analysis=[hessian]"])
    assert cfg.analysis.landscape is None
    assert OmegaConf.select(cfg, "analysis.hessian.method") == "power_iteration"
