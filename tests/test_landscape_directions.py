import copy

import numpy as np
import pytest
import torch
from torch import nn

from vizpipe.analyses import loss_landscape
from vizpipe.analyses.directions import (
    check_fits,
    pca_directions,
    random_directions,
    state_entries,
    target_directions,
)
from vizpipe.errors import VizpipeError
from vizpipe.models import SmallCNN
from vizpipe.records import landscape_metrics


def make_model(seed):
    torch.manual_seed(seed)
    model = SmallCNN(input_channel=1, class_number=3, width=4, hidden=8)
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.3, 0.3)
        model.bn2.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def data():
    torch.manual_seed(1)
    return torch.randn(60, 1, 8, 8), torch.randint(0, 3, (60,))


def direct_loss(model, x, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model.eval()(x), y))


def test_negative_moved_variance_clamped_not_nan(data, caplog):
    x, y = data
    start, end = make_model(0), make_model(1)
    with torch.no_grad():
        start.bn1.running_var.fill_(1.0)
        end.bn1.running_var.fill_(0.2)  # at alpha = 1.5 the variance is 1 + 1.5 * (0.2 - 1) = -0.2
    directions = target_directions(start, [end.state_dict()])
    result = loss_landscape(
        start, [(x, y)], nn.CrossEntropyLoss(), noise_range=[-0.5, 1.5], resolution=5, dims=1,
        directions=directions, progress=False,
    )
    assert torch.isfinite(result.loss).all()
    assert result.settings["clamped_variance_points"] == 1
    assert "clamped to 0" in caplog.text
    beyond = copy.deepcopy(start)
    with torch.no_grad():
        for (name, tensor), other in zip(state_entries(beyond, True), state_entries(end, True)):
            tensor.copy_(tensor + 1.5 * (other[1] - tensor))
        beyond.bn1.running_var.clamp_(min=0)
    assert beyond.bn1.running_var.max().item() == 0.0
    assert result.loss[4].item() == pytest.approx(direct_loss(beyond, x, y), rel=1e-5)
    assert start.bn1.running_var.eq(1.0).all(), "the model's statistics are restored"


def test_interpolation_endpoints_are_the_two_checkpoints(data):
    x, y = data
    start, end = make_model(0), make_model(1)
    directions = target_directions(start, [end.state_dict()])
    assert "bn1.running_mean" in directions.names  # BatchNorm statistics move too
    result = loss_landscape(
        start, [(x, y)], nn.CrossEntropyLoss(), noise_range=[-0.5, 1.5], resolution=5, dims=1,
        directions=directions, progress=False,
    )
    assert result.x.tolist() == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert result.loss.shape == (5,)
    assert result.y is None
    assert result.loss[1].item() == pytest.approx(direct_loss(start, x, y), rel=1e-6)
    assert result.loss[3].item() == pytest.approx(direct_loss(end, x, y), rel=1e-5)
    midpoint = copy.deepcopy(start)
    with torch.no_grad():
        for (name, tensor), other in zip(state_entries(midpoint, True), state_entries(end, True)):
            tensor.copy_((tensor + other[1]) / 2)
    assert result.loss[2].item() == pytest.approx(direct_loss(midpoint, x, y), rel=1e-5)
    # The start model is unchanged, buffers included.
    assert torch.equal(start.bn1.running_mean, make_model(0).bn1.running_mean)


def test_two_targets_span_a_plane(data):
    x, y = data
    base, first, second = make_model(0), make_model(1), make_model(2)
    result = loss_landscape(
        base, [(x, y)], nn.CrossEntropyLoss(), noise_range=[0, 1], resolution=2,
        directions=target_directions(base, [first.state_dict(), second.state_dict()]), progress=False,
    )
    assert result.loss[0, 1].item() == pytest.approx(direct_loss(first, x, y), rel=1e-5)   # x=1, y=0
    assert result.loss[1, 0].item() == pytest.approx(direct_loss(second, x, y), rel=1e-5)  # x=0, y=1


def test_pca_directions_match_numpy_svd():
    base = make_model(0)
    trajectory = [make_model(seed).state_dict() for seed in (3, 4, 5, 6)]
    directions = pca_directions(base, trajectory, dims=2, ignore="biasbn")

    entries = state_entries(base)
    rows = []
    for state in trajectory:
        rows.append(np.concatenate([
            (state[name] - tensor.detach()).numpy().ravel() if tensor.dim() > 1 else np.zeros(tensor.numel())
            for name, tensor in entries
        ]))
    matrix = np.stack(rows).astype(np.float64)
    centered = matrix - matrix.mean(axis=0)
    _, singular, vt = np.linalg.svd(centered, full_matrices=False)

    flat = [torch.cat([d.flatten() for d in vector]).double().numpy() for vector in directions.vectors]
    assert abs(flat[0] @ flat[1]) < 1e-6
    for k in range(2):
        assert np.linalg.norm(flat[k]) == pytest.approx(1.0, abs=1e-6)
        assert abs(flat[k] @ vt[k]) == pytest.approx(1.0, abs=1e-5)
    ratios = singular**2 / (singular**2).sum()
    np.testing.assert_allclose(directions.extras["explained_variance_ratio"].numpy(), ratios[:2], rtol=1e-5)
    np.testing.assert_allclose(directions.extras["trajectory"].numpy(), matrix @ np.stack(flat).T, rtol=1e-4, atol=1e-5)
    one_d = [d for name, d in zip(directions.names, directions.vectors[0]) if name.endswith("bias")]
    assert all(torch.count_nonzero(d) == 0 for d in one_d)


def test_pca_needs_enough_distinct_checkpoints():
    base = make_model(0)
    with pytest.raises(VizpipeError, match="at least 3"):
        pca_directions(base, [make_model(1).state_dict()] * 2, dims=2)
    with pytest.raises(VizpipeError, match="identical"):
        pca_directions(base, [make_model(1).state_dict()] * 3, dims=2)


def test_random_directions_with_buffers_and_mismatch_errors(data):
    x, y = data
    model = make_model(0)
    with_buffers = random_directions(model, dims=2, seed=0, ignore="none", include_buffers=True)
    assert "bn2.running_var" in with_buffers.names
    index = with_buffers.names.index("bn2.running_var")
    assert torch.equal(with_buffers.vectors[0][index], model.bn2.running_var)  # 1-D entries follow their own values
    line = random_directions(model, dims=1, seed=0)
    with pytest.raises(VizpipeError, match="1D but the landscape is 2D"):
        loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), dims=2, directions=line, progress=False)
    other = SmallCNN(input_channel=1, class_number=5, width=4, hidden=8)
    with pytest.raises(VizpipeError, match="fc2.weight has shape"):
        check_fits(state_entries(model), random_directions(other, dims=1), 1)
    with pytest.raises(VizpipeError, match="target checkpoint 1 lacks entries"):
        target_directions(model, [{"conv1.weight": model.conv1.weight}])


def test_y_range_containing_zero_and_one_dim_line(data):
    x, y = data
    model = make_model(0)
    result = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=1.0, y_range=[0, 1], resolution=3, progress=False)
    assert result.y.tolist() == [0.0, 0.5, 1.0]
    assert result.loss[0, 1].item() == pytest.approx(result.base_loss, rel=1e-6)  # x = 0, y = 0
    line = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), dims=1, resolution=5, seed=3, progress=False)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for parameter, d in zip(moved.parameters(), line.directions.vectors[0]):
            parameter.add_(0.5 * d)
    assert line.loss[3].item() == pytest.approx(direct_loss(moved, x, y), rel=1e-5)


def test_resume_keeps_done_points_and_computes_the_rest(data):
    x, y = data
    model = make_model(0)
    full = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), resolution=3, seed=2, progress=False)
    done = torch.zeros(3, 3, dtype=torch.bool)
    done[0] = True
    sentinel = torch.full((3, 3), 123.0, dtype=torch.float64)
    calls = []
    resumed = loss_landscape(
        model, [(x, y)], nn.CrossEntropyLoss(), resolution=3, seed=2, progress=False,
        resume=(sentinel, sentinel, done), on_point=lambda index, loss, accuracy: calls.append(index),
    )
    assert len(calls) == 6
    assert resumed.loss[0].tolist() == [123.0] * 3  # kept, not recomputed
    assert torch.equal(resumed.loss[1:], full.loss[1:])
    assert bool(resumed.done.all())


def test_diverged_points_stored_and_left_out_of_metrics(data):
    x, y = data
    model = make_model(0)

    def fragile_loss(outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets)
        return loss if outputs.abs().max() < 3.0 else loss * float("nan")

    result = loss_landscape(model, [(x, y)], fragile_loss, noise_range=3.0, resolution=5, progress=False)
    diverged = int(torch.isnan(result.loss).sum())
    assert 0 < diverged < 25
    metrics = landscape_metrics(result)
    assert metrics["landscape/diverged_points"] == diverged
    assert np.isfinite(metrics["landscape/min_loss"])
    assert metrics["landscape/min_loss"] == pytest.approx(float(result.loss[torch.isfinite(result.loss)].min()))
    assert "landscape/loss_increase_mean" in metrics


def test_summary_metrics_against_hand_values(data):
    x, y = data
    model = make_model(0)
    result = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=1.0, resolution=5, seed=4, progress=False)
    metrics = landscape_metrics(result, radius=0.5)
    # Points within radius 0.5 of the center on a 5x5 grid with spacing 0.5: the center and its 4 neighbours.
    inside = torch.stack([result.loss[2, 2], result.loss[1, 2], result.loss[3, 2], result.loss[2, 1], result.loss[2, 3]])
    assert metrics["landscape/loss_increase_mean"] == pytest.approx(float((inside - result.base_loss).mean()))
    assert metrics["landscape/loss_increase_max"] == pytest.approx(float((inside - result.base_loss).max()))
    best = int(result.loss.argmin())
    assert metrics["landscape/min_loss_x"] == result.x[best % 5].item()
    assert metrics["landscape/min_loss_y"] == result.y[best // 5].item()
