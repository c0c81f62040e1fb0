import math

import pytest
import torch
from torch import nn

from vizpipe.analyses import activation_maximization
from vizpipe.analyses.am.parameterizations import FourierImage
from vizpipe.analyses.activation_maximization import channel_activation, layer_output
from vizpipe.analyses.am.objectives import Objective
from vizpipe.data import digits
from vizpipe.errors import VizpipeError
from vizpipe.models import SmallCNN


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = SmallCNN(input_channel=1, class_number=10, width=4, hidden=8)
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 1.5)
        model.bn1.running_mean.uniform_(-0.2, 0.2)
    return model


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_activation_rises_above_start_and_real_images(cnn):
    data = digits(image_shape=[1, 12, 12])
    result = activation_maximization(cnn, "conv2", [1, 12, 12], iterations=60, lr=0.1, mean=data.mean, std=data.std,
                                     progress=False)
    assert result.channels == list(range(8))
    assert bool((result.final_activations > result.start_activations).all())

    # Recompute the stored images' activations independently of the optimizer's bookkeeping.
    cnn.eval()
    with torch.no_grad():
        output = layer_output(cnn, cnn.conv2, result.images)
        recomputed = channel_activation(output, torch.tensor(result.channels))
        real = layer_output(cnn, cnn.conv2, data.x_test).mean(dim=(2, 3))
    torch.testing.assert_close(recomputed.double(), result.final_activations, rtol=1e-4, atol=1e-5)
    assert bool((recomputed > real.max(dim=0).values).all())
    assert result.display_images.min() >= 0
    assert result.display_images.max() <= 1


def test_model_left_untouched(cnn):
    cnn.train()
    cnn.fc1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in cnn.parameters()]
    strides = [p.stride() for p in cnn.parameters()]
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    activation_maximization(cnn, "conv1", [1, 8, 8], iterations=5, jitter=1, channels_last=True, progress=False)
    assert all(len(m._forward_hooks) == 0 for m in cnn.modules())
    assert all(p.grad is None for p in cnn.parameters())
    assert [p.requires_grad for p in cnn.parameters()] == flags
    assert [p.stride() for p in cnn.parameters()] == strides
    assert cnn.training
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())


@pytest.mark.parametrize(
    "options",
    [
        dict(tv_weight=0.1),
        dict(tv_weight=0.1, jitter=2, scale=[0.9, 1.1], rotation=10.0, blur_every=4, norm_crop=10.0),
        dict(parameterization="fourier", l2_weight=0.1, jitter=1),
        dict(images_per_channel=2, diversity_weight=1.0, objective="neuron"),
    ],
    ids=["pixel", "transforms", "fourier", "diversity"],
)
def test_batched_equals_one_channel_at_a_time(cnn, options):
    common = dict(iterations=20, lr=0.05, progress=False, seed=3, **options)
    together = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[1, 4, 6], **common)
    copies = options.get("images_per_channel", 1)
    for index, channel in enumerate([1, 4, 6]):
        alone = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[channel], **common)
        rows = slice(index * copies, (index + 1) * copies)
        torch.testing.assert_close(together.display_images[rows], alone.display_images, rtol=1e-4, atol=1e-4)
    chunked = activation_maximization(cnn, "conv2", [1, 10, 10], channels=[1, 4, 6], batch_size=copies, **common)
    torch.testing.assert_close(together.display_images, chunked.display_images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer, objective", [("conv1", "channel"), ("conv2", "channel"), ("conv2", "neuron")])
def test_target_channels_only_equals_whole_layer(cnn, layer, objective):
    common = dict(channels=[0, 1, 3], iterations=15, lr=0.05, tv_weight=0.5, objective=objective, progress=False, seed=2)
    sliced = activation_maximization(cnn, layer, [1, 10, 10], **common)
    whole = activation_maximization(cnn, layer, [1, 10, 10], target_channels_only=False, **common)
    torch.testing.assert_close(sliced.history, whole.history, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sliced.display_images, whole.display_images, rtol=1e-4, atol=1e-4)
    assert (sliced.final_activations > sliced.start_activations).all(), "each image raised its own channel"


def test_frames_and_history_shapes(cnn):
    result = activation_maximization(cnn, "conv1", [1, 8, 8], channels=[0, 2], iterations=12, frame_every=5, progress=False)
    assert result.frame_iterations == [0, 5, 10, 12]
    assert result.frames.shape == (4, 2, 1, 8, 8)
    assert result.frames.dtype == torch.uint8
    assert result.history.shape == (13, 2)
    assert torch.equal(result.frames[-1], (result.display_images * 255).round().to(torch.uint8))


def test_linear_unit_of_last_layer(cnn):
    result = activation_maximization(cnn, "fc2", [1, 8, 8], channels=[3], iterations=30, lr=0.1, progress=False)
    assert result.final_activations[0] > result.start_activations[0]


def test_negative_objective_lowers_activation(cnn):
    result = activation_maximization(cnn, "conv2", [1, 8, 8], iterations=30, lr=0.1, negative=True, progress=False)
    assert bool((result.final_activations < result.start_activations).all())


def test_bad_options_rejected(cnn):
    with pytest.raises(VizpipeError, match="conv1"):
        activation_maximization(cnn, "conv_1", [1, 8, 8], iterations=1)
    with pytest.raises(VizpipeError, match="out of range"):
        activation_maximization(cnn, "conv1", [1, 8, 8], channels=[99], iterations=1)
    with pytest.raises(VizpipeError, match="outside the layer's spatial shape"):
        activation_maximization(cnn, "conv1", [1, 8, 8], objective="neuron", position=[8, 0], iterations=1)
    with pytest.raises(VizpipeError, match="parameterization='pixel'"):
        activation_maximization(cnn, "conv1", [1, 8, 8], parameterization="fourier", norm_crop=10, iterations=1)
    with pytest.raises(VizpipeError, match="percentile"):
        activation_maximization(cnn, "conv1", [1, 8, 8], contribution_crop=100, iterations=1)
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


def test_first_linear_layer_norm_constrained_optimum():
    """Maximizing w . x + b over ||x|| = r gives x = r w / ||w||: the filter's direction."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 3))
    mean, std = [0.4, 0.6], [0.2, 0.3]
    result = activation_maximization(
        model, "1", [2, 6, 6], iterations=150, lr=0.05, mean=mean, std=std, clamp=False, norm_constraint=3.0,
        progress=False,
    )
    weight, bias = model[1].weight.detach(), model[1].bias.detach()
    for index, unit in enumerate(result.channels):
        assert _cosine(result.images[index], weight[unit]) > 0.99, unit
        assert result.images[index].norm().item() == pytest.approx(3.0, rel=1e-4)
        best = 3.0 * weight[unit].norm() + bias[unit]
        assert result.final_activations[index].item() == pytest.approx(best.item(), rel=1e-3)


def test_first_conv_neuron_norm_constrained_optimum():
    """A neuron of a first conv layer is w . patch + b; with the input's norm fixed the
    optimum is the filter on that neuron's receptive field, zero elsewhere."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU())
    result = activation_maximization(
        model, "0", [3, 7, 7], objective="neuron", position=[1, 3], iterations=200, lr=0.05, clamp=False,
        norm_constraint=1.0, progress=False,
    )
    assert result.settings["position"] == [1, 3]
    for index, channel in enumerate(result.channels):
        expected = torch.zeros(3, 7, 7)
        expected[:, 1:4, 3:6] = conv.weight.detach()[channel]
        assert _cosine(result.images[index], expected) > 0.99, channel


def test_neuron_objective_defaults_to_center():
    output = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    activation = Objective("neuron").activation(output, torch.tensor([2, 0]))
    torch.testing.assert_close(activation, torch.stack([output[0, 2, 2, 2], output[1, 0, 2, 2]]))


def test_diversity_spreads_images_of_a_channel(cnn):
    from vizpipe.analyses.am.objectives import diversity

    common = dict(channels=[0, 3], iterations=40, lr=0.1, images_per_channel=3, progress=False)
    plain = activation_maximization(cnn, "conv2", [1, 10, 10], **common)
    diverse = activation_maximization(cnn, "conv2", [1, 10, 10], diversity_weight=5.0, **common)
    assert plain.channels == [0, 0, 0, 3, 3, 3]
    cnn.eval()
    with torch.no_grad():
        similarity_plain = diversity(layer_output(cnn, cnn.conv2, plain.images), 3)
        similarity_diverse = diversity(layer_output(cnn, cnn.conv2, diverse.images), 3)
    assert bool((similarity_diverse < similarity_plain).all())
    # The channel objective still wins on average over each channel's images.
    final = diverse.final_activations.view(2, 3).mean(dim=1)
    start = diverse.start_activations.view(2, 3).mean(dim=1)
    assert bool((final > start).all())


@pytest.mark.parametrize("option", ["norm_crop", "contribution_crop"])
def test_crop_regularizers_apply_every_step(cnn, option):
    result = activation_maximization(
        cnn, "conv2", [1, 10, 10], channels=[1, 2], iterations=30, lr=0.05, mean=[0.5], std=[0.25],
        frame_every=1, progress=False, **{option: 30.0},
    )
    frames = result.frames.float()
    at_mean = (frames == 128).flatten(1)  # 0.5 * 255 rounds to 128
    # The crop runs after every step, so every frame after the first has at least 30% of its pixels at the mean.
    assert bool((at_mean[1:].float().mean(dim=1) >= 0.3).all())
    # The optimizer still updates the same tensor, so the image keeps changing and the activation keeps rising.
    changed = (frames[1:] != frames[:-1]).flatten(1).any(dim=1)
    assert bool(changed.all())
    assert bool((result.final_activations > result.start_activations).all())


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("parameterization", ["pixel", "fourier"])
def test_grayscale_and_four_channel_models(channels, parameterization):
    torch.manual_seed(0)
    model = SmallCNN(input_channel=channels, class_number=10, width=4, hidden=8)
    mean, std = [0.5] * channels, [0.25] * channels
    result = activation_maximization(
        model, "conv2", [channels, 9, 11], channels=[0, 5], iterations=25, lr=0.1, mean=mean, std=std,
        parameterization=parameterization, jitter=1, progress=False,
    )
    assert result.images.shape == (2, channels, 9, 11)
    assert result.frames.shape[2:] == (channels, 9, 11)
    assert bool((result.final_activations > result.start_activations).all())


def test_fourier_start_image_is_not_saturated():
    image = FourierImage([3, 32, 32], image_seeds=[0, 1], init_std=0.01, color_correlation=None,
                         device=torch.device("cpu"), dtype=torch.float32)
    pixels = image.pixels()
    assert pixels.min() > 0.3, "a saturated sigmoid would have no gradient"
    assert pixels.max() < 0.7
    assert pixels.std() > 1e-3, "the start is noise, not a constant"


def test_fourier_colour_correlation_keeps_gray():
    from vizpipe.analyses.am.parameterizations import color_correlation_sqrt

    gray = torch.rand(50, 1, 6, 6).repeat(1, 3, 1, 1)
    correlation = color_correlation_sqrt(gray)
    assert torch.linalg.matrix_rank(correlation.double(), tol=1e-4) == 1
    torch.manual_seed(0)
    model = SmallCNN(input_channel=3, class_number=10, width=4, hidden=8)
    result = activation_maximization(
        model, "conv1", [3, 8, 8], iterations=30, lr=0.1, parameterization="fourier",
        color_correlation=correlation, progress=False,
    )
    assert result.display_images.min() >= 0
    assert result.display_images.max() <= 1
    # Rank-one colour mixing keeps the three channels equal: the images stay gray.
    torch.testing.assert_close(result.display_images[:, 0], result.display_images[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(result.display_images[:, 0], result.display_images[:, 2], atol=1e-5, rtol=0)
    assert bool((result.final_activations > result.start_activations).all())


def test_untraceable_model_uses_hook_and_matches():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent branch: torch.fx cannot trace it
                x = x * 0
            return self.head(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = Branching()
    result = activation_maximization(model, "conv", [1, 6, 6], iterations=10, lr=0.1, progress=False)
    with torch.no_grad():
        direct = model.conv((result.display_images - 0.0) / 1.0).mean(dim=(2, 3))
    torch.testing.assert_close(result.final_activations, direct.diagonal().double(), rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(result.final_activations.sum()))


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    from vizpipe.analyses.am.transforms import gaussian_blur, total_variation

    torch.manual_seed(0)
    images = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    blurred = gaussian_blur(images, sigma=1.0)
    expected = gaussian_filter(images.numpy(), sigma=(0, 0, 1.0, 1.0), mode="mirror", truncate=3.0)
    torch.testing.assert_close(blurred, torch.from_numpy(expected), rtol=1e-10, atol=1e-10)
    # sigma 1 pixel visibly smooths: a checkerboard loses most of its total variation.
    checkerboard = (torch.arange(8).view(-1, 1) + torch.arange(8).view(1, -1)).remainder(2).double().view(1, 1, 8, 8)
    assert total_variation(gaussian_blur(checkerboard, sigma=1.0)).item() < 0.2 * total_variation(checkerboard).item()


def test_random_affine_integer_shift_is_exact():
    from vizpipe.analyses.am.transforms import random_affine

    images = torch.rand(2, 1, 6, 7, dtype=torch.float64)
    parameters = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    moved = random_affine(images, parameters)
    torch.testing.assert_close(moved[0, :, :, 1:], images[0, :, :, :-1])  # one pixel to the right
    torch.testing.assert_close(moved[1], images[1])


def _model_with_dead_channels() -> nn.Module:
    """Conv(1 -> 4) and ReLU. Conv channel 3 has a zero filter, so it is dead in both layers;
    ReLU channel 1 never fires (bias -1000). Channels 0 and 2 fire from the start (bias 0.5)."""
    from collections import OrderedDict

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3, padding=1), relu=nn.ReLU(), head=nn.Conv2d(4, 2, 3)))
    with torch.no_grad():
        model.conv.bias.copy_(torch.tensor([0.5, -1000.0, 0.5, 0.2]))
        model.conv.weight[3] = 0.0
    return model


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(tv_weight=0.5, clamp=False),
        dict(norm_constraint=3.0, clamp=False),
        dict(parameterization="fourier", jitter=1),
        dict(images_per_channel=2, diversity_weight=0.5),
        dict(negative=True, l2_weight=0.1, contribution_crop=20.0),
    ],
    ids=["pixel", "tv-unclamped", "norm-constraint", "fourier", "diversity", "negative-crop"],
)
@pytest.mark.parametrize("layer, dead_channels", [("relu", [1, 3]), ("conv", [3])])
def test_dead_channel_flagged_with_finite_images(layer, dead_channels, options, caplog):
    model = _model_with_dead_channels()
    with caplog.at_level("WARNING", logger="vizpipe.analyses.activation_maximization"):
        result = activation_maximization(model, layer, [1, 8, 8], iterations=15, lr=0.1, progress=False, **options)
    copies = options.get("images_per_channel", 1)
    expected = torch.tensor([c in dead_channels for c in range(4) for _ in range(copies)])
    assert torch.equal(result.dead, expected)
    assert bool(torch.isfinite(result.images).all())
    assert bool(torch.isfinite(result.display_images).all())
    assert bool(torch.isfinite(result.history).all())
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"Activation maximization {layer}: {len(dead_channels)} of 4 channels are dead" in warnings[0]
    assert warnings[0].endswith(f"channels {dead_channels}")


def test_live_channels_unaffected_by_dead_one():
    model = _model_with_dead_channels()
    common = dict(iterations=20, lr=0.1, tv_weight=0.2, progress=False, seed=5)
    together = activation_maximization(model, "relu", [1, 8, 8], **common)
    live = activation_maximization(model, "relu", [1, 8, 8], channels=[0, 2], **common)
    assert together.dead.tolist() == [False, True, False, True]
    assert not live.dead.any()
    torch.testing.assert_close(together.images[[0, 2]], live.images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.final_activations[[0, 2]], live.final_activations, rtol=1e-5, atol=1e-6)
    assert bool((live.final_activations > live.start_activations).all())


def test_layer_images_independent_of_earlier_work():
    """A model that draws random numbers in its forward pass gives the same images for a layer
    whatever used the global generator before, and the caller's generator state is kept."""

    class NoisyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
            self.conv2 = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            return self.conv2(x + 0.1 * torch.randn_like(x))

    torch.manual_seed(0)
    model = NoisyCNN()
    common = dict(iterations=10, lr=0.1, progress=False, seed=2)
    first = activation_maximization(model, "conv2", [1, 6, 6], **common)
    activation_maximization(model, "conv1", [1, 6, 6], **common)
    torch.rand(100)
    state = torch.get_rng_state()
    second = activation_maximization(model, "conv2", [1, 6, 6], **common)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.history, second.history)


def test_compiled_matches_eager(cnn):
    """``compile=True`` runs the same optimization through torch.compile, so the images agree up
    to floating-point reordering. It compiles for 17 s or less on 2 busy CPU cores with an empty
    inductor cache, so it stays in the fast suite."""
    common = dict(channels=[0, 1, 2], iterations=8, lr=0.1, tv_weight=0.1, jitter=1, progress=False, seed=1)
    eager = activation_maximization(cnn, "bn1", [1, 8, 8], **common)
    compiled = activation_maximization(cnn, "bn1", [1, 8, 8], compile=True, **common)
    torch.testing.assert_close(compiled.images, eager.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.history, eager.history, rtol=1e-4, atol=1e-5)
    assert torch.equal(compiled.dead, eager.dead)
    assert all(len(m._forward_hooks) == 0 for m in cnn.modules())
