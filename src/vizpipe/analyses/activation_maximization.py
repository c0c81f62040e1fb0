"""Activation maximization (Erhan et al. 2009; Olah et al. 2017): gradient ascent on
input images so that each image maximizes one channel (or neuron, or unit) of a layer.

All selected channels of a layer are optimized together, image ``i`` for channel
``i`` (or ``images_per_channel`` consecutive images per channel), and the
forward pass stops at the target layer. In eval mode the images do not
interact, because BatchNorm uses running statistics, Adam's state is per
element and random transforms are drawn per image. So the batch gives the same
images as one run per channel, up to floating-point rounding.

The parts compose: ``am.objectives`` (what is maximized), ``am.parameterizations``
(pixels or a Fourier spectrum), ``am.transforms`` (penalties, random transforms,
in-place regularizers) and ``am.forward`` (the model cut at the layer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.am import transforms as T
from vizpipe.analyses.am.forward import (
    capture_output,
    channels_last_weights,
    frozen_eval,
    SelectedChannelForward,
    layer_forward,
    layer_output,
    selected_channel_forward,
)
from vizpipe.analyses.am.objectives import Objective, diversity
from vizpipe.analyses.am.parameterizations import PARAMETERIZATIONS, FourierImage, PixelImage
from vizpipe.analyses.modules import find_layer
from vizpipe.errors import VizpipeError

log = logging.getLogger(__name__)

__all__ = [
    "ActivationMaximizationResult",
    "activation_maximization",
    "capture_output",
    "channel_activation",
    "count_channels",
    "dead_channels",
    "frozen_eval",
    "layer_output",
    "total_variation",
]

total_variation = T.total_variation


@dataclass
class ActivationMaximizationResult:
    """Optimized images for the channels of one layer.

    Image ``i`` belongs to channel ``channels[i]``; with ``images_per_channel = K``
    each channel has K consecutive images. ``images`` [N, C, H, W] are the model
    inputs (normalized with the dataset's mean and std, unclipped);
    ``display_images`` are the same images in pixel space, clipped to [0, 1].
    ``history[k, i]`` is image ``i``'s activation before step ``k + 1``, and its
    last row is after the last step, on the untransformed image. ``frames``
    [n_frames, N, C, H, W] are uint8 pixel snapshots taken at ``frame_iterations``.
    ``dead[i]`` is True when the objective's gradient with respect to the model
    input was exactly zero for image ``i`` at every step, so nothing but the
    regularizers moved it (a ReLU that never fires, a filter of zeros).
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
    dead: torch.Tensor
    settings: dict = field(default_factory=dict)


def channel_activation(output: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Mean activation of channel ``channels[i]`` in ``output[i]`` (dim 1 is the channel)."""
    return Objective("channel").activation(output, channels)


def count_channels(model: nn.Module, module: nn.Module, image_shape, device, dtype=torch.float32) -> int:
    """Return the size of dim 1 of ``module``'s output for one zero image of ``image_shape``."""
    return int(_output_shape(model, module, image_shape, device, dtype)[0])


def _output_shape(model, module, image_shape, device, dtype) -> list[int]:
    """Shape of ``module``'s output for one image, without the batch dimension."""
    with frozen_eval(model), torch.no_grad():
        output = layer_output(model, module, torch.zeros((1, *image_shape), device=device, dtype=dtype))
    if output.dim() < 2:
        raise VizpipeError(f"layer output has shape {list(output.shape)}; it needs a channel dimension")
    return list(output.shape[1:])


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise VizpipeError(message)


def activation_maximization(
    model: nn.Module,
    layer: str,
    image_shape: Sequence[int],
    channels: Sequence[int] | None = None,
    iterations: int = 200,
    lr: float = 0.05,
    objective: str = "channel",
    position: Sequence[int] | None = None,
    negative: bool = False,
    images_per_channel: int = 1,
    diversity_weight: float = 0.0,
    parameterization: str = "pixel",
    color_correlation: torch.Tensor | None = None,
    tv_weight: float = 0.0,
    l2_weight: float = 0.0,
    weight_decay: float = 0.0,
    blur_every: int = 0,
    blur_sigma: float = 1.0,
    jitter: int = 0,
    scale: Sequence[float] = (1.0, 1.0),
    rotation: float = 0.0,
    norm_crop: float = 0.0,
    contribution_crop: float = 0.0,
    norm_constraint: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    init_std: float | None = None,
    clamp: bool = True,
    frame_every: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    compile: bool = False,
    channels_last: bool | None = None,
    target_channels_only: bool = True,
    progress: bool = True,
) -> ActivationMaximizationResult:
    """Find images that maximize (or minimize) the activation of each channel of ``layer``.

    Args:
        model: any module; it runs in eval mode with ``requires_grad`` switched off
            on its parameters (both restored afterwards), so no ``.grad`` appears.
        layer: dotted module name as in ``model.named_modules()``.
        image_shape: [C, H, W] of the images, any channel count.
        channels: channel (or unit) indices; default every channel of the layer.
        iterations: Adam steps; ``lr`` is Adam's step size, ``weight_decay`` its L2 term
            on the optimized tensor.
        objective: ``"channel"`` (mean over positions; a linear layer's unit) or
            ``"neuron"`` (one position, ``position`` = (row, column) of the layer's
            output, default its center). ``negative`` minimizes instead.
        images_per_channel: K images per channel, with ``diversity_weight`` times the
            mean Gram-matrix cosine similarity between them subtracted from the score.
        parameterization: ``"pixel"`` (Gaussian start around mid-gray with ``init_std``,
            default 0.1) or ``"fourier"`` (a 1/f-scaled spectrum, start ``init_std``
            default 0.01, mixed by ``color_correlation`` [C, C] and squashed by a sigmoid).
        tv_weight: weight of the total variation of the pixel image.
        l2_weight: weight of the mean squared normalized input.
        blur_every, blur_sigma: pixel parameterization only; blur the pixels in place
            with a Gaussian of ``blur_sigma`` pixels every ``blur_every`` steps (0: off).
        jitter, scale, rotation: random transforms before each forward pass: a shift of
            up to ``jitter`` pixels, a scale factor in [scale[0], scale[1]], a rotation of
            up to ``rotation`` degrees either way.
        norm_crop, contribution_crop: pixel parameterization only. After every step,
            the pixels below this percentile (0-100) of norm, or of contribution
            ``|input * gradient|``, are set to the dataset mean in place (0: off).
        norm_constraint: pixel parameterization only; after every step scale each
            normalized input to this L2 norm (None: off). Use with ``clamp=False``.
        mean, std: the dataset's per-channel normalization; the model sees
            ``(pixels - mean) / std``. Default 0 and 1.
        clamp: pixel parameterization only; keep pixels in [0, 1] after each step.
        frame_every: keep a frame every this many steps (and the first and last).
        batch_size: images optimized together per chunk (at least one channel's K images).
        seed: fixes start images and random transforms; an image starts and moves the
            same whichever other channels are selected. The global torch generator is
            also seeded with it for the duration (and restored afterwards), so a model
            that draws random numbers in its forward pass gives the same images for a
            layer whatever ran before in the process.
        compile: run the model cut at the layer (at the layer's input when only the
            target channels are computed) through ``torch.compile``. It adds
            compilations of tens of seconds on a 2-core CPU per layer (for the steps, the
            final evaluation without gradients and a smaller last chunk). The images equal
            eager mode's up to floating-point reordering. It is off by default because
            ``scripts/bench_am.py`` measured it slower per step than eager on ResNet-8
            on a 2-core CPU (see docs/benchmarks.md).
        channels_last: channels-last memory format for 4D inputs and weights; default
            on for CPU, where oneDNN convolutions run faster with it.
        target_channels_only: when the layer is an ungrouped ``Conv2d`` and no
            diversity term needs its whole output, compute at the layer only each
            image's own channel (one grouped convolution), not all of them. The
            images equal those of the whole layer up to floating-point reordering.
        progress: show a tqdm progress bar.

    A channel whose images are all ``dead`` (see ``ActivationMaximizationResult``)
    is reported in one warning; its images stay finite but show no feature.

    Example::

        result = activation_maximization(model, "conv1", image_shape=[1, 16, 16], iterations=100)
        result.display_images.shape  # [channels, 1, 16, 16]
    """
    # 1. Check the options and find the layer.
    _check(iterations >= 1, f"invalid iterations {iterations}: it must be at least 1")
    _check(frame_every >= 1, f"invalid frame_every {frame_every}: it must be at least 1")
    _check(batch_size >= 1, f"invalid batch_size {batch_size}: it must be at least 1")
    _check(images_per_channel >= 1, f"invalid images_per_channel {images_per_channel}: it must be at least 1")
    _check(parameterization in PARAMETERIZATIONS,
           f"invalid parameterization {parameterization!r}; use one of {', '.join(PARAMETERIZATIONS)}")
    for name, value in (("norm_crop", norm_crop), ("contribution_crop", contribution_crop)):
        _check(0 <= value < 100, f"invalid {name} {value}: give a percentile in [0, 100), 0 for off")
    _check(blur_every >= 0, f"invalid blur_every {blur_every}: it must be 0 (off) or positive")
    _check(blur_every == 0 or blur_sigma > 0, f"invalid blur_sigma {blur_sigma}: it must be positive")
    _check(jitter >= 0, f"invalid jitter {jitter}: it must be 0 (off) or a positive number of pixels")
    _check(len(scale) == 2 and 0 < scale[0] <= scale[1], f"invalid scale {list(scale)}: give [min, max] with 0 < min <= max")
    _check(norm_constraint is None or norm_constraint > 0, f"invalid norm_constraint {norm_constraint}: it must be positive")
    if parameterization == "fourier":
        pixel_only = {"blur_every": blur_every, "norm_crop": norm_crop, "contribution_crop": contribution_crop,
                      "norm_constraint": norm_constraint}
        used = [name for name, value in pixel_only.items() if value]
        _check(not used, f"{', '.join(used)} act on pixels in place and need parameterization='pixel'")
    objective_fn = Objective(objective, None if position is None else tuple(position), negative)
    image_shape = [int(v) for v in image_shape]
    module = find_layer(model, layer, purpose="activation maximization")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    num_channels = image_shape[0]
    mean_t = torch.tensor(mean if mean is not None else [0.0] * num_channels, device=device, dtype=dtype)
    std_t = torch.tensor(std if std is not None else [1.0] * num_channels, device=device, dtype=dtype)
    _check(mean_t.numel() == num_channels and std_t.numel() == num_channels,
           f"mean and std need {num_channels} values, one per image channel")
    mean_t, std_t = mean_t.view(1, -1, 1, 1), std_t.view(1, -1, 1, 1)
    if channels_last is None:
        channels_last = device.type == "cpu"
    if init_std is None:
        init_std = 0.1 if parameterization == "pixel" else 0.01

    # 2. Check the channels against the layer's output.
    with _seeded_global_rng(seed, device):
        output_shape = _output_shape(model, module, image_shape, device, dtype)
    available = output_shape[0]
    channels = list(range(available)) if channels is None else [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < available]
    _check(not bad, f"channel(s) {bad} out of range for layer {layer!r}, which has {available} channels (0..{available - 1})")
    _check(bool(channels), f"no channel selected for layer {layer!r}")
    if objective == "neuron":
        objective_fn.resolve_position(output_shape[1:])

    # 3. Optimize the channels chunk by chunk.
    loop = _Loop(
        objective=objective_fn, image_shape=image_shape, iterations=iterations, lr=lr,
        images_per_channel=images_per_channel, diversity_weight=diversity_weight,
        parameterization=parameterization, color_correlation=color_correlation, tv_weight=tv_weight,
        l2_weight=l2_weight, weight_decay=weight_decay, blur_every=blur_every, blur_sigma=blur_sigma,
        jitter=jitter, scale=(float(scale[0]), float(scale[1])), rotation=rotation, norm_crop=norm_crop,
        contribution_crop=contribution_crop, norm_constraint=norm_constraint, mean=mean_t, std=std_t,
        init_std=init_std, clamp=clamp, seed=seed, channels_last=channels_last, device=device, dtype=dtype,
        frame_iterations=sorted({0, *range(frame_every, iterations, frame_every), iterations}),
        images_total=available * images_per_channel,
    )
    channels_per_chunk = max(1, batch_size // images_per_channel)
    chunks = []
    bar = tqdm(total=iterations * len(channels) * images_per_channel, desc=f"activation max {layer}",
               disable=None if progress else True, unit="image-step")
    with frozen_eval(model), (channels_last_weights(model) if channels_last else nullcontext()), \
            _seeded_global_rng(seed, device):
        forward = None
        if target_channels_only and not (diversity_weight and images_per_channel > 1):
            forward = selected_channel_forward(model, layer, module, compile=compile)
        if forward is None:
            forward = layer_forward(model, layer, module, compile=compile)
        try:
            for start in range(0, len(channels), channels_per_chunk):
                chunks.append(loop.run(forward, channels[start : start + channels_per_chunk], bar))
        finally:
            bar.close()

    pixels = torch.cat([c["pixels"] for c in chunks])
    history = torch.cat([c["history"] for c in chunks], dim=1)
    image_channels = [c for c in channels for _ in range(images_per_channel)]
    dead = torch.cat([c["dead"] for c in chunks])
    _warn_dead_channels(layer, image_channels, dead)
    return ActivationMaximizationResult(
        layer=layer,
        channels=image_channels,
        images=(pixels - mean_t.cpu()) / std_t.cpu(),
        display_images=pixels.clamp(0.0, 1.0),
        start_activations=history[0],
        final_activations=history[-1],
        history=history,
        frames=torch.cat([c["frames"] for c in chunks], dim=1),
        frame_iterations=loop.frame_iterations,
        dead=dead,
        settings=dict(
            iterations=iterations, lr=lr, objective=objective,
            position=list(objective_fn.resolve_position(output_shape[1:])) if objective == "neuron" else None,
            negative=negative, images_per_channel=images_per_channel, diversity_weight=diversity_weight,
            parameterization=parameterization, tv_weight=tv_weight, l2_weight=l2_weight,
            weight_decay=weight_decay, blur_every=blur_every, blur_sigma=blur_sigma, jitter=jitter,
            scale=[float(scale[0]), float(scale[1])], rotation=rotation, norm_crop=norm_crop,
            contribution_crop=contribution_crop, norm_constraint=norm_constraint, init_std=init_std,
            clamp=clamp, frame_every=frame_every, seed=seed, mean=mean_t.flatten().tolist(),
            std=std_t.flatten().tolist(),
        ),
    )


def layer_output_of_targets(forward, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the layer's output and, per image, the index of its target channel in that output."""
    if isinstance(forward, SelectedChannelForward):
        return forward(inputs, targets), torch.zeros_like(targets)
    return forward(inputs), targets


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators (CPU, and every GPU when ``device`` is one) for the block, and restore them afterwards."""
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        yield


def dead_channels(channels: Sequence[int], dead: torch.Tensor) -> list[int]:
    """Return the channels all of whose images are dead, in order of first appearance."""
    flags: dict[int, bool] = {}
    for channel, image_dead in zip(channels, dead.tolist()):
        flags[channel] = flags.get(channel, True) and bool(image_dead)
    return [channel for channel, is_dead in flags.items() if is_dead]


def _warn_dead_channels(layer: str, channels: list[int], dead: torch.Tensor) -> None:
    found = dead_channels(channels, dead)
    if found:
        log.warning(
            "Activation maximization %s: %d of %d channels are dead (zero gradient with respect to the input at "
            "every step), so their images show no feature: channels %s",
            layer, len(found), len(dict.fromkeys(channels)), found,
        )


@dataclass
class _Loop:
    """The optimization of one chunk of channels; the settings are fixed for a layer."""

    objective: Objective
    image_shape: list[int]
    iterations: int
    lr: float
    images_per_channel: int
    diversity_weight: float
    parameterization: str
    color_correlation: torch.Tensor | None
    tv_weight: float
    l2_weight: float
    weight_decay: float
    blur_every: int
    blur_sigma: float
    jitter: int
    scale: tuple[float, float]
    rotation: float
    norm_crop: float
    contribution_crop: float
    norm_constraint: float | None
    mean: torch.Tensor
    std: torch.Tensor
    init_std: float
    clamp: bool
    seed: int
    channels_last: bool
    device: torch.device
    dtype: torch.dtype
    frame_iterations: list[int]
    images_total: int

    @property
    def transforms_on(self) -> bool:
        return bool(self.jitter) or self.scale != (1.0, 1.0) or bool(self.rotation)

    def image_ids(self, chunk: list[int]) -> list[int]:
        """Global index of each image: channel * K + copy, the same in every chunking."""
        return [c * self.images_per_channel + k for c in chunk for k in range(self.images_per_channel)]

    def make_image(self, image_ids: list[int]):
        image_seeds = [self.seed * 1_000_003 + i for i in image_ids]
        if self.parameterization == "pixel":
            return PixelImage(self.image_shape, image_seeds, self.init_std, self.clamp, self.device, self.dtype)
        return FourierImage(self.image_shape, image_seeds, self.init_std, self.color_correlation,
                            self.device, self.dtype)

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs = (pixels - self.mean) / self.std
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def run(self, forward, chunk: list[int], bar) -> dict[str, torch.Tensor]:
        image_ids = self.image_ids(chunk)
        image = self.make_image(image_ids)
        targets = torch.tensor([c for c in chunk for _ in range(self.images_per_channel)], device=self.device)
        optimizer = torch.optim.Adam(image.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        pixel_tensor = image.parameters()[0] if self.parameterization == "pixel" else None
        if self.norm_constraint is not None:
            T.project_l2_(pixel_tensor, self.mean, self.std, self.norm_constraint)
        history, frames = [], []
        # alive[i]: the objective's gradient at the network input was nonzero (or NaN) for image i at some step.
        alive = torch.zeros(len(image_ids), dtype=torch.bool, device=self.device)

        for step in range(self.iterations + 1):
            if step in self.frame_iterations:
                with torch.no_grad():
                    frames.append((image.pixels().detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
            if step == self.iterations:
                break
            optimizer.zero_grad(set_to_none=True)
            loss, activation, network_input = self.loss(forward, image.pixels(), targets, step)
            history.append(activation.detach())
            alive |= self.objective_gradient_nonzero(loss, activation, network_input)
            gradient = pixel_tensor.grad.clone() if self.contribution_crop else None
            if self.norm_constraint is not None:
                T.tangent_gradient_(pixel_tensor, self.mean, self.std)
            optimizer.step()
            self.regularize_in_place(image, pixel_tensor, gradient, step + 1)
            bar.update(len(image_ids))

        with torch.no_grad():
            output, columns = layer_output_of_targets(forward, self.model_input(image.pixels()), targets)
            history.append(self.objective.activation(output, columns))
            pixels = image.pixels().detach().cpu()
        return {
            "pixels": pixels,
            "history": torch.stack(history).double().cpu(),
            "frames": torch.stack(frames),
            "dead": (~alive).cpu(),
        }

    def objective_gradient_nonzero(self, loss, activation, network_input) -> torch.Tensor:
        """Backpropagate ``loss`` and return [B]: whether the objective's gradient at the network input is nonzero.

        Without the diversity term, the network input gets gradient from the
        objective alone, so a hook reads it during the one backward pass. The
        diversity term also flows through the network, so then the objective's
        gradient costs a second backward pass.
        """
        captured = {}
        if self.diversity_weight and self.images_per_channel > 1 and activation.requires_grad:
            (captured["gradient"],) = torch.autograd.grad(
                -self.objective.score(activation).sum(), network_input, retain_graph=True, allow_unused=True
            )
            loss.backward()
        else:
            handle = network_input.register_hook(lambda gradient: captured.update(gradient=gradient))
            try:
                loss.backward()
            finally:
                handle.remove()
        gradient = captured.get("gradient")
        if gradient is None:  # the objective does not depend on the input at all
            return torch.zeros(network_input.shape[0], dtype=torch.bool, device=network_input.device)
        return (gradient != 0).flatten(1).any(dim=1)

    def loss(self, forward, pixels: torch.Tensor, targets: torch.Tensor, step: int):
        """Return the loss to minimize, the objective's activation per image [B] and the network's input.

        The network's input is a view of the normalized input that only the
        network consumes, so its gradient excludes the L2 penalty's.
        """
        seen = pixels
        if self.transforms_on:
            generator = torch.Generator().manual_seed(self.seed * 7_919 + step)
            table = T.affine_parameters(generator, self.images_total, self.jitter, self.scale, self.rotation)
            ids = torch.tensor(self.image_ids(targets[:: self.images_per_channel].tolist()))
            seen = T.random_affine(pixels, table[ids])
        inputs = self.model_input(seen)
        network_input = inputs.view_as(inputs)
        output, columns = layer_output_of_targets(forward, network_input, targets)
        activation = self.objective.activation(output, columns)
        loss = -self.objective.score(activation).sum()
        if self.tv_weight:
            loss = loss + self.tv_weight * T.total_variation(pixels).sum()
        if self.l2_weight:
            loss = loss + self.l2_weight * T.l2_penalty(inputs).sum()
        if self.diversity_weight and self.images_per_channel > 1:
            loss = loss + self.diversity_weight * diversity(output, self.images_per_channel).sum()
        return loss, activation, network_input

    def regularize_in_place(self, image, pixels: torch.Tensor | None, gradient, step: int) -> None:
        """Apply clamping and the in-place regularizers after optimizer step ``step``."""
        image.after_step()
        if pixels is None:
            return
        if self.blur_every and step % self.blur_every == 0:
            T.gaussian_blur_(pixels, self.blur_sigma)
        if self.norm_crop:
            T.norm_crop_(pixels, self.mean, self.std, self.norm_crop)
        if self.contribution_crop:
            T.contribution_crop_(pixels, gradient, self.mean, self.std, self.contribution_crop)
        if self.norm_constraint is not None:
            T.project_l2_(pixels, self.mean, self.std, self.norm_constraint)
