import math

import pytest
import torch

from vizpipe.analyses import conv_kernels, kernel_grid
from vizpipe.errors import VizpipeError
from vizpipe.models import SmallCNN, resnet8


def test_default_selects_every_conv_layer():
    model = SmallCNN(input_channel=1, class_number=10)
    result = conv_kernels(model)
    assert list(result.weights) == ["conv1", "conv2"]
    assert torch.equal(result.weights["conv2"], model.conv2.weight.detach())


def test_non_conv_layer_rejected():
    with pytest.raises(VizpipeError, match="is a Linear, expected Conv2d"):
        conv_kernels(SmallCNN(), ["fc1"])


def test_tile_normalization_spans_unit_range():
    weight = torch.randn(4, 2, 3, 3)
    grid = kernel_grid(weight, normalize="tile")
    assert grid.shape == (4 * 4 - 1, 2 * 4 - 1)
    first_tile = grid[0:3, 0:3]
    assert first_tile.min() == 0.0
    assert first_tile.max() == pytest.approx(1.0)
    torch.testing.assert_close(first_tile, (weight[0, 0] - weight[0, 0].min()) / (weight[0, 0].max() - weight[0, 0].min()))
    assert torch.isnan(grid[3, 0])  # padding row


def test_grid_normalization_keeps_zero_at_half():
    weight = torch.zeros(2, 2, 3, 3)
    weight[0, 0, 0, 0] = 2.0
    weight[1, 1, 2, 2] = -1.0
    grid = kernel_grid(weight, normalize="grid")
    assert grid[0, 0] == 1.0
    assert grid[4 + 2, 4 + 2] == 0.25
    assert grid[1, 1] == 0.5


def test_rgb_kernels_one_tile_per_filter():
    weight = resnet8().pre_conv.weight.detach()
    grid = kernel_grid(weight)
    side = math.ceil(math.sqrt(64))
    assert grid.shape == (side * 8 - 1, side * 8 - 1, 3)
