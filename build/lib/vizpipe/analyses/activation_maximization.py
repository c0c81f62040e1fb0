"""Activation maximization (Erhan et al. 2009): gradient ascent on input images so
that each image maximizes the mean activation of one channel of a layer.

All selected channels of a layer are optimized together, image ``i`` for channel
``i``, and the forward pass stops at the target layer. With the model in eval
mode the images do not interact (BatchNorm uses running statistics, Adam's
state is per element), so the batch gives the same images as one run per
channel, up to floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.modules import find_layer
from vizpipe.errors import VizpipeError


@dataclass
class ActivationMaximizationResult:
    """Optimized images for the channels of one layer.

    ``display_images`` are in pixel space [0, 1], shape [channels, C, H, W];
    ``images`` are the same images normalized as the model sees them.
    ``history[k, i]`` is channel ``channels[i]``'s mean activation after ``k`` steps
    (row 0 is the start image); ``frames`` [n_frames, channels, C, H, W] are uint8
    pixel snapshots taken at ``frame_iterations``.
    """

    layer: str
    channels: list[int]
    images: torch.Tensor
    display_images: torch.Tensor
    start_activations: torch.Tensor
    final_activations: torch.Tensor
    history: torch.Tensor
    frames: torch.Tensor
    frame_iterations: list[int]
    settings: dict


class _StopForward(Exception):
    pass


@contextmanager
def _capture_output(module: nn.Module, stop: bool = True):
    """Record the output of ``module``; with ``stop``, abort the forward pass right after it."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["output"] = output
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def frozen_eval(model: nn.Module):
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter; restore both."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        model.eval()
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        model.train(was_training)


def layer_output(model: nn.Module, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``inputs`` up to ``module`` and return that module's output."""
    with _capture_output(module) as captured:
        try:
            model(inputs)
        except _StopForward:
            pass
    if "output" not in captured:
        raise VizpipeError(f"layer {type(module).__name__} was not reached in the model's forward pass")
    output = captured["output"]
    if not isinstance(output, torch.Tensor):
        raise VizpipeError(f"layer output is a {type(output).__name__}, not a tensor; pick another layer")
    return output


def channel_activation(output: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Mean activation of channel ``channels[i]`` in ``output[i]`` (dim 1 is the channel)."""
    rows = torch.arange(output.shape[0], device=output.device)
    selected = output[rows, channels]
    return selected.flatten(1).mean(dim=1) if selected.dim() > 1 else selected


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation per image: mean absolute difference of neighbouring pixels."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(dim=1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(dim=1)
    return dx + dy


def count_channels(model: nn.Module, module: nn.Module, image_shape, device, dtype=torch.float32) -> int:
    """Return the size of dim 1 of ``module``'s output for one zero image of ``image_shape``."""
    with frozen_eval(model), torch.no_grad():
        output = layer_output(model, module, torch.zeros((1, *image_shape), device=device, dtype=dtype))
    if output.dim() < 2:
        raise VizpipeError(f"layer output has shape {list(output.shape)}; it needs a channel dimension")
    return output.shape[1]


def activation_maximization(
    model: nn.Module,
    layer: str,
    image_shape: Sequence[int],
    channels: Sequence[int] | None = None,
    iterations: int = 200,
    lr: float = 0.05,
    tv_weight: float = 0.0,
    weight_decay: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    init_std: float = 0.1,
    clamp: bool = True,
    frame_every: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> ActivationMaximizationResult:
    """Find one image per channel of ``layer`` that maximizes the channel's mean activation.

    Args:
        model: any module; it is run in eval mode with ``requires_grad`` switched
            off on its parameters (both restored afterwards), so no ``.grad`` appears.
        layer: dotted module name as in ``model.named_modules()``.
        image_shape: [C, H, W] of the optimized images.
        channels: channel indices (default: every channel of the layer's output).
        iterations: Adam steps on the images; ``lr`` is Adam's step size and
            ``weight_decay`` its L2 term.
        tv_weight: weight of the total-variation penalty (smoother images).
        mean, std: the dataset's per-channel normalization; images are optimized in
            pixel space [0, 1] and normalized before the forward pass.
        init_std: standard deviation of the Gaussian start around mid-grey (0.5).
        clamp: keep pixels in [0, 1] after every step (in place, so every step counts).
        frame_every: keep a frame every this many steps (plus the first and last).
        batch_size: channels optimized together per chunk.
        seed: fixes the start images; channel ``c`` starts from the same image
            whichever other channels are selected.

    Example::

        result = activation_maximization(model, "conv1", image_shape=[1, 16, 16], iterations=100)
        result.display_images.shape  # [channels, 1, 16, 16]
    """
    if iterations < 1:
        raise VizpipeError(f"invalid iterations {iterations}: it must be at least 1")
    if frame_every < 1:
        raise VizpipeError(f"invalid frame_every {frame_every}: it must be at least 1")
    if batch_size < 1:
        raise VizpipeError(f"invalid batch_size {batch_size}: it must be at least 1")
    image_shape = [int(v) for v in image_shape]
    module = find_layer(model, layer, purpose="activation maximization")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    num_channels = image_shape[0]
    mean_t = torch.tensor(mean if mean is not None else [0.0] * num_channels, device=device, dtype=dtype)
    std_t = torch.tensor(std if std is not None else [1.0] * num_channels, device=device, dtype=dtype)
    if mean_t.numel() != num_channels or std_t.numel() != num_channels:
        raise VizpipeError(f"mean and std need {num_channels} values, one per image channel")
    mean_t, std_t = mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)

    with frozen_eval(model):
        available = count_channels(model, module, image_shape, device, dtype)
        channels = list(range(available)) if channels is None else [int(c) for c in channels]
        bad = [c for c in channels if not 0 <= c < available]
        if bad:
            raise VizpipeError(
                f"channel(s) {bad} out of range for layer {layer!r}, which has {available} channels (0..{available - 1})"
            )
        if not channels:
            raise VizpipeError(f"no channel selected for layer {layer!r}")

        frame_iterations = sorted({0, *range(frame_every, iterations, frame_every), iterations})
        chunks = []
        bar = tqdm(total=iterations * len(channels), desc=f"activation max {layer}", disable=None if progress else True, unit="step")
        try:
            for start in range(0, len(channels), batch_size):
                chunk = channels[start : start + batch_size]
                chunks.append(
                    _optimize_chunk(
                        model, module, chunk, image_shape, iterations, lr, tv_weight, weight_decay,
                        mean_t, std_t, init_std, clamp, frame_iterations, seed, device, dtype, bar,
                    )
                )
        finally:
            bar.close()

    pixels = torch.cat([c["pixels"] for c in chunks])
    return ActivationMaximizationResult(
        layer=layer,
        channels=channels,
        images=((pixels - mean_t.cpu()) / std_t.cpu()),
        display_images=pixels,
        start_activations=torch.cat([c["history"][0] for c in chunks]),
        final_activations=torch.cat([c["history"][-1] for c in chunks]),
        history=torch.cat([c["history"] for c in chunks], dim=1),
        frames=torch.cat([c["frames"] for c in chunks], dim=1),
        frame_iterations=frame_iterations,
        settings=dict(
            iterations=iterations, lr=lr, tv_weight=tv_weight, weight_decay=weight_decay,
            init_std=init_std, clamp=clamp, frame_every=frame_every, seed=seed,
        ),
    )


def _start_images(channels, image_shape, init_std, seed) -> torch.Tensor:
    images = []
    for channel in channels:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + channel)
        images.append(0.5 + init_std * torch.randn(image_shape, generator=generator))
    return torch.stack(images)


def _optimize_chunk(
    model, module, chunk, image_shape, iterations, lr, tv_weight, weight_decay,
    mean_t, std_t, init_std, clamp, frame_iterations, seed, device, dtype, bar,
) -> dict[str, torch.Tensor]:
    pixels = _start_images(chunk, image_shape, init_std, seed).to(device=device, dtype=dtype)
    if clamp:
        pixels.clamp_(0.0, 1.0)
    pixels.requires_grad_(True)
    targets = torch.tensor(chunk, device=device)
    optimizer = torch.optim.Adam([pixels], lr=lr, weight_decay=weight_decay)
    history = []
    frames = []

    def snapshot(step: int) -> None:
        if step in frame_iterations:
            frames.append((pixels.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())

    snapshot(0)
    for step in range(1, iterations + 1):
        optimizer.zero_grad(set_to_none=True)
        activation = channel_activation(layer_output(model, module, (pixels - mean_t) / std_t), targets)
        history.append(activation.detach().cpu())
        loss = -activation.sum()
        if tv_weight:
            loss = loss + tv_weight * total_variation(pixels).sum()
        loss.backward()
        optimizer.step()
        if clamp:
            with torch.no_grad():
                pixels.clamp_(0.0, 1.0)
        snapshot(step)
        bar.update(len(chunk))

    with torch.no_grad():
        final = channel_activation(layer_output(model, module, (pixels - mean_t) / std_t), targets)
    history.append(final.cpu())
    return {
        "pixels": pixels.detach().cpu(),
        "history": torch.stack(history).double(),
        "frames": torch.stack(frames),
    }
