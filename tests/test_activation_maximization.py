import pytest
import torch

from vizpipe.analyses import activation_maximization
from vizpipe.analyses.activation_maximization import channel_activation, layer_output
from vizpipe.errors import VizpipeError
from vizpipe.models import SmallCNN


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = SmallCNN(input_channel=1, class_number=10, width=4, hidden=8)
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model


def test_activation_rises_above_start_and_real_images(cnn):
    result = activation_maximization(cnn, "conv2", [1, 12, 12], iterations=60, lr=0.1, mean=[0.5], std=[0.25], progress=False)
    assert result.channels == list(range(8))
    assert bool((result.final_activations > result.start_activations).all())

    # Recompute the stored images' activations independently of the optimizer's bookkeeping.
    cnn.eval()
    with torch.no_grad():
        output = layer_output(cnn, cnn.conv2, result.images)
        recomputed = channel_activation(output, torch.tensor(result.channels))
        real_pixels = torch.rand(64, 1, 12, 12)
        random_images = layer_output(cnn, cnn.conv2, (real_pixels - 0.5) / 0.25).mean(dim=(2, 3))
    torch.testing.assert_close(recomputed.double(), result.final_activations, rtol=1e-4, atol=1e-5)
    assert bool((recomputed > random_images.max(dim=0).values).all())
    assert result.display_images.min() >= 0 and result.display_images.max() <= 1


def test_model_left_untouched(cnn):
    cnn.train()
    cnn.fc1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in cnn.parameters()]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    activation_maximization(cnn, "conv1", [1, 8, 8], iterations=5, progress=False)
    assert all(len(m._forward_hooks) == 0 for m in cnn.modules())
    assert all(p.grad is None for p in cnn.parameters())
    assert [p.requires_grad for p in cnn.parameters()] == flags
    assert cnn.training
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


def test_batched_equals_one_channel_at_a_time(cnn):
    options = dict(iterations=25, lr=0.05, tv_weight=0.1, progress=False, seed=3)
    together = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[1, 4, 6], **options)
    for index, channel in enumerate([1, 4, 6]):
        alone = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[channel], **options)
        torch.testing.assert_close(together.display_images[index], alone.display_images[0], rtol=1e-4, atol=1e-4)
    chunked = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[1, 4, 6], batch_size=2, **options)
    torch.testing.assert_close(together.display_images, chunked.display_images, rtol=1e-4, atol=1e-4)


def test_frames_and_history_shapes(cnn):
    result = activation_maximization(cnn, "conv1", [1, 8, 8], channels=[0, 2], iterations=12, frame_every=5, progress=False)
    assert result.frame_iterations == [0, 5, 10, 12]
    assert result.frames.shape == (4, 2, 1, 8, 8)
    assert result.frames.dtype == torch.uint8
    assert result.history.shape == (13, 2)


def test_linear_layer_unit(cnn):
    result = activation_maximization(cnn, "fc2", [1, 8, 8], channels=[3], iterations=30, lr=0.1, progress=False)
    assert result.final_activations[0] > result.start_activations[0]


def test_bad_layer_and_channel_rejected(cnn):
    with pytest.raises(VizpipeError, match="conv1"):
        activation_maximization(cnn, "conv_1", [1, 8, 8], iterations=1)
    with pytest.raises(VizpipeError, match="out of range"):
        activation_maximization(cnn, "conv1", [1, 8, 8], channels=[99], iterations=1)
    assert all(len(m._forward_hooks) == 0 for m in cnn.modules())


def test_first_layer_reaches_box_constrained_optimum(cnn):
    """conv1's channel mean is linear in the pixels, so on the box [0, 1] the optimum
    sets each pixel to 1 where the gradient is positive and to 0 elsewhere."""
    mean, std = [0.5], [0.25]
    result = activation_maximization(cnn, "conv1", [1, 8, 8], iterations=100, lr=0.1, mean=mean, std=std, progress=False)
    cnn.eval()
    for index, channel in enumerate(result.channels):
        pixels = torch.full((1, 1, 8, 8), 0.5, requires_grad=True)
        channel_activation(layer_output(cnn, cnn.conv1, (pixels - 0.5) / 0.25), torch.tensor([channel])).sum().backward()
        optimum = (pixels.grad > 0).float()
        with torch.no_grad():
            best = channel_activation(layer_output(cnn, cnn.conv1, (optimum - 0.5) / 0.25), torch.tensor([channel]))
        assert result.final_activations[index].item() == pytest.approx(best.item(), abs=1e-4), channel
        torch.testing.assert_close(result.display_images[index], optimum[0], atol=1e-3, rtol=0)
