"""Loss landscapes along filter-normalized random directions (Li et al. 2018,
"Visualizing the Loss Landscape of Neural Nets")."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.evaluation import Batch, LossFn, evaluate
from vizpipe.errors import VizpipeError

NORMALIZATIONS = ("filter", "layer", "none")
IGNORE_OPTIONS = ("biasbn", "none")


@dataclass
class LandscapeResult:
    """Loss and accuracy on a 2D grid through the weights.

    ``loss[i, j]`` and ``accuracy[i, j]`` are at ``theta + x[j] * d1 + y[i] * d2``
    (float64, unclipped; NaN or inf where the model diverged). ``directions``
    holds d1 and d2 as one tensor per parameter in ``parameter_names`` order.
    """

    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor
    base_loss: float
    base_accuracy: float
    num_samples: int
    parameter_names: list[str]
    directions: tuple[list[torch.Tensor], list[torch.Tensor]]
    normalization: str
    ignore: str
    seed: int | None


def random_direction(
    model: nn.Module,
    generator: torch.Generator | None = None,
    normalization: str = "filter",
    ignore: str = "biasbn",
) -> list[torch.Tensor]:
    """Draw a Gaussian direction with one tensor per parameter of ``model``.

    ``normalization="filter"`` rescales each output filter (slice along dim 0) of a
    weight with 2 or more dims to the norm of the same filter in the model;
    ``"layer"`` rescales whole tensors; ``"none"`` keeps the raw Gaussian. 1-D
    tensors (biases, BatchNorm) get a zero direction with ``ignore="biasbn"``, and
    a copy of their own values otherwise, as in Li et al.'s code. Directions are
    drawn on the CPU from ``generator``, so a seed gives the same direction on any
    device.
    """
    if normalization not in NORMALIZATIONS:
        raise VizpipeError(f"invalid direction normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    if ignore not in IGNORE_OPTIONS:
        raise VizpipeError(f"invalid ignore option {ignore!r}; use one of {', '.join(IGNORE_OPTIONS)}")
    direction = []
    for parameter in model.parameters():
        weight = parameter.detach()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight)
        if weight.dim() <= 1:
            noise = torch.zeros_like(weight) if ignore == "biasbn" else weight.clone()
        elif normalization == "filter":
            weight_norms = weight.flatten(1).norm(dim=1)
            noise_norms = noise.flatten(1).norm(dim=1)
            scale = weight_norms / (noise_norms + 1e-10)
            noise = noise * scale.view(-1, *[1] * (weight.dim() - 1))
        elif normalization == "layer":
            noise = noise * (weight.norm() / (noise.norm() + 1e-10))
        direction.append(noise)
    return direction


@contextmanager
def restored_weights(model: nn.Module):
    """Yield the model's parameters and a copy of their values; restore both on exit.

    Exiting (normally, by an exception or by KeyboardInterrupt) copies the saved
    values back bit-exactly and restores the model's train/eval mode.
    """
    parameters = list(model.parameters())
    saved = [p.detach().clone() for p in parameters]
    was_training = model.training
    try:
        yield parameters, saved
    finally:
        with torch.no_grad():
            for parameter, value in zip(parameters, saved):
                parameter.copy_(value)
        model.train(was_training)


def coordinates(noise_range: float | tuple[float, float], resolution: int) -> torch.Tensor:
    """Evenly spaced coordinates: ``[-r, r]`` for a number ``r`` or ``[min, max]`` for a pair."""
    if isinstance(noise_range, (int, float)):
        low, high = -float(noise_range), float(noise_range)
    else:
        values = list(noise_range)
        if len(values) != 2:
            raise VizpipeError(f"invalid noise_range {values}: give one number r or a pair [min, max]")
        low, high = float(values[0]), float(values[1])
    if not low < high:
        raise VizpipeError(f"invalid noise_range: minimum {low} must be below maximum {high}")
    if resolution < 1:
        raise VizpipeError(f"invalid resolution {resolution}: it must be at least 1")
    if resolution == 1:
        return torch.tensor([(low + high) / 2], dtype=torch.float64)
    return torch.linspace(low, high, resolution, dtype=torch.float64)


def loss_landscape(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    noise_range: float | tuple[float, float] = 1.0,
    resolution: int = 21,
    directions: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    normalization: str = "filter",
    ignore: str = "biasbn",
    seed: int | None = 0,
    progress: bool = True,
    on_row: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> LandscapeResult:
    """Evaluate loss and accuracy on a ``resolution`` x ``resolution`` grid through the weights.

    Args:
        model: evaluated in eval mode; its weights are moved in place and restored
            bit-exactly afterwards, also when an exception interrupts the loop.
        batches: evaluation (inputs, targets) batches, already on the model's device.
        loss_fn: mean-reduced loss, e.g. ``nn.CrossEntropyLoss()``.
        noise_range: coordinate range of both axes, ``r`` for ``[-r, r]`` or ``[min, max]``.
        resolution: points per axis.
        directions: two directions as from ``random_direction``; drawn from ``seed`` if None.
        on_row: called as ``on_row(i, loss[i], accuracy[i])`` after each finished row.

    Example::

        result = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=1.0, resolution=11)
        result.loss  # [11, 11] float64
    """
    batches = list(batches)
    x = coordinates(noise_range, resolution)
    y = x.clone()
    names = [name for name, _ in model.named_parameters()]
    if directions is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        directions = (
            random_direction(model, generator, normalization, ignore),
            random_direction(model, generator, normalization, ignore),
        )
    _check_directions(model, directions)
    parameters_now = list(model.parameters())
    directions = tuple([d.to(p) for d, p in zip(direction, parameters_now)] for direction in directions)

    loss = torch.full((len(y), len(x)), float("nan"), dtype=torch.float64)
    accuracy = torch.full_like(loss, float("nan"))
    with restored_weights(model) as (parameters, base):
        model.eval()
        base_loss, base_accuracy, count = evaluate(model, batches, loss_fn)
        bar = tqdm(total=loss.numel(), desc="loss landscape", disable=None if progress else True, unit="point")
        try:
            for i, b in enumerate(y.tolist()):
                for j, a in enumerate(x.tolist()):
                    with torch.no_grad():
                        for parameter, origin, d1, d2 in zip(parameters, base, *directions):
                            torch.add(origin, d1, alpha=a, out=parameter)
                            parameter.add_(d2, alpha=b)
                    loss[i, j], accuracy[i, j], _ = evaluate(model, batches, loss_fn)
                    bar.update()
                if on_row is not None:
                    on_row(i, loss[i], accuracy[i])
        finally:
            bar.close()

    return LandscapeResult(
        x=x,
        y=y,
        loss=loss,
        accuracy=accuracy,
        base_loss=base_loss,
        base_accuracy=base_accuracy,
        num_samples=count,
        parameter_names=names,
        directions=(
            [d.detach().cpu() for d in directions[0]],
            [d.detach().cpu() for d in directions[1]],
        ),
        normalization=normalization,
        ignore=ignore,
        seed=seed,
    )


def _check_directions(model: nn.Module, directions) -> None:
    shapes = [tuple(p.shape) for p in model.parameters()]
    if len(directions) != 2:
        raise VizpipeError(f"a 2D landscape needs 2 directions, got {len(directions)}")
    for index, direction in enumerate(directions):
        got = [tuple(d.shape) for d in direction]
        if got != shapes:
            raise VizpipeError(
                f"direction {index + 1} does not fit the model: {len(got)} tensors for {len(shapes)} "
                "parameters, or different shapes; draw directions from this model"
            )
