import copy

import pytest
import torch
from torch import nn

from vizpipe.analyses import loss_landscape, random_direction
from vizpipe.analyses.evaluation import evaluate
from vizpipe.errors import VizpipeError
from vizpipe.models import SmallCNN


@pytest.fixture
def cnn_problem():
    torch.manual_seed(0)
    model = SmallCNN(input_channel=1, class_number=3, width=4, hidden=8)
    with torch.no_grad():  # a model that has seen data: non-default BatchNorm statistics
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn2.running_var.uniform_(0.5, 1.5)
    x = torch.randn(101, 1, 8, 8)
    y = torch.randint(0, 3, (101,))
    return model, x, y


def snapshot(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_center_equals_direct_loss(cnn_problem):
    model, x, y = cnn_problem
    loss_fn = nn.CrossEntropyLoss()
    result = loss_landscape(model, [(x, y)], loss_fn, noise_range=0.5, resolution=5, progress=False)
    model.eval()
    with torch.no_grad():
        direct = float(loss_fn(model(x), y))
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert result.x[2] == 0.0
    assert result.y[2] == 0.0
    assert result.loss[2, 2].item() == pytest.approx(direct, rel=1e-6)
    assert result.base_loss == pytest.approx(direct, rel=1e-6)
    assert result.accuracy[2, 2].item() == pytest.approx(accuracy)


def test_off_center_point_equals_weights_moved_by_hand(cnn_problem):
    model, x, y = cnn_problem
    loss_fn = nn.CrossEntropyLoss()
    result = loss_landscape(model, [(x, y)], loss_fn, noise_range=(-1.0, 0.5), resolution=4, seed=7, progress=False)
    i, j = 1, 3  # y = -0.5, x = 0.5
    a, b = result.x[j].item(), result.y[i].item()
    moved = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parameter, d1, d2 in zip(moved.parameters(), *result.directions.vectors):
            parameter.add_(a * d1 + b * d2)
        expected = float(loss_fn(moved(x), y))
    assert result.loss[i, j].item() == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(result.base_loss, rel=1e-3), "the point must be away from the minimum"


def test_weights_and_mode_restored_bit_exactly(cnn_problem):
    model, x, y = cnn_problem
    model.train()
    before = snapshot(model)
    loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), resolution=3, progress=False)
    after = snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.training


def test_channels_last_equals_default_layout(cnn_problem):
    model, x, y = cnn_problem
    storage = {name: p.data_ptr() for name, p in model.named_parameters()}
    before = snapshot(model)
    common = dict(noise_range=0.5, resolution=4, seed=3, progress=False)
    standard = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), channels_last=False, **common)
    fast = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), **common)
    assert not standard.settings["channels_last"]
    assert fast.settings["channels_last"], "a CPU conv model with image inputs defaults to channels-last"
    torch.testing.assert_close(fast.loss, standard.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.accuracy, standard.accuracy, rtol=0, atol=0)
    after = snapshot(model)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    for name, parameter in model.named_parameters():
        assert parameter.data_ptr() == storage[name], f"{name} was left on another storage"
        assert parameter.is_contiguous(), f"{name} was left in channels-last order"


def test_weights_restored_after_exception(cnn_problem):
    model, x, y = cnn_problem
    before = snapshot(model)
    calls = {"count": 0}

    def failing_loss(outputs, targets):
        calls["count"] += 1
        if calls["count"] == 4:
            raise RuntimeError("simulated failure mid-grid")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="simulated"):
        loss_landscape(model, [(x, y)], failing_loss, resolution=3, progress=False)
    after = snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_uneven_last_batch_weighted_by_samples(cnn_problem):
    model, x, y = cnn_problem
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    batched = [(x[:100], y[:100]), (x[100:], y[100:])]
    loss, _, count = evaluate(model, batched, loss_fn)
    with torch.no_grad():
        full = float(loss_fn(model(x), y))
        batch_means = [float(loss_fn(model(bx), by)) for bx, by in batched]
    assert count == 101
    assert loss == pytest.approx(full, rel=1e-6)
    naive = sum(batch_means) / 2
    assert abs(naive - full) > 1e-4, "the example must tell sample- and batch-weighted means apart"


def test_filter_normalized_direction(cnn_problem):
    model, _, _ = cnn_problem
    direction = random_direction(model, torch.Generator().manual_seed(0), "filter", "biasbn")
    for (name, weight), d in zip(model.named_parameters(), direction):
        if weight.dim() <= 1:
            assert torch.count_nonzero(d) == 0, name
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), weight.detach().flatten(1).norm(dim=1))


def test_direction_for_another_model_is_rejected(cnn_problem):
    model, x, y = cnn_problem
    other = SmallCNN(input_channel=1, class_number=5, width=4, hidden=8)
    directions = (random_direction(other), random_direction(other))
    with pytest.raises(VizpipeError, match="does not fit the model"):
        loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), directions=directions, progress=False)


def test_seed_fixes_directions(cnn_problem):
    model, x, y = cnn_problem
    first = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), resolution=3, seed=5, progress=False)
    second = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), resolution=3, seed=5, progress=False)
    assert torch.equal(first.loss, second.loss)


@pytest.mark.parametrize("noise_range, resolution", [((1.0, 1.0), 5), ((2.0, -1.0), 5), (1.0, 0)])
def test_invalid_grid_rejected(cnn_problem, noise_range, resolution):
    model, x, y = cnn_problem
    with pytest.raises(VizpipeError):
        loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=noise_range, resolution=resolution)
