"""Loss landscapes: loss and accuracy on a 1D line or 2D plane through the weights
(Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"; Goodfellow et
al. 2015 for linear interpolation)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe import distributed
from vizpipe.analyses.directions import (
    Directions,
    _random_vector,
    check_fits,
    check_random_options,
    random_directions,
    state_entries,
)
from vizpipe.analyses.am.forward import channels_last_weights
from vizpipe.analyses.evaluation import Batch, LossFn, evaluate
from vizpipe.errors import VizpipeError

log = logging.getLogger(__name__)

# With compile=None, the forward pass is compiled when the eager grid would take
# longer than this, estimated from the timed evaluation of the unmoved model.
# torch.compile of ResNet-8 took 15-75 s on a 2-core CPU (torch 2.13) and then
# ran the forward pass about 4.8x faster, so it pays off only on long grids.
COMPILE_MIN_SECONDS = 120.0


@dataclass
class LandscapeResult:
    """Loss and accuracy along one or two directions through the weights.

    For 2D, ``loss[i, j]`` and ``accuracy[i, j]`` are at
    ``theta + x[j] * d1 + y[i] * d2``; for 1D, ``loss[j]`` is at ``theta + x[j] * d1``
    and ``y`` is None. Values are float64 and unclipped, NaN or inf where the
    model diverged. ``done`` marks the points evaluated (all, unless the run was
    interrupted).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    loss: torch.Tensor
    accuracy: torch.Tensor
    done: torch.Tensor
    base_loss: float
    base_accuracy: float
    num_samples: int
    directions: Directions
    settings: dict = field(default_factory=dict)

    @property
    def parameter_names(self) -> list[str]:
        return self.directions.names


def random_direction(
    model: nn.Module,
    generator: torch.Generator | None = None,
    normalization: str = "filter",
    ignore: str = "biasbn",
) -> list[torch.Tensor]:
    """Draw one filter-normalized Gaussian direction over the model's parameters.

    See ``vizpipe.analyses.directions.random_directions`` for the scalings.
    """
    check_random_options(normalization, ignore)
    return _random_vector(state_entries(model), generator, normalization, ignore)


@contextmanager
def restored_state(model: nn.Module, tensors: list[torch.Tensor]):
    """Save ``tensors`` (parameters or buffers of ``model``) and restore them bit-exactly on exit.

    Exiting normally, by an exception or by KeyboardInterrupt copies the saved
    values back and restores the model's train/eval mode.
    """
    saved = [t.detach().clone() for t in tensors]
    was_training = model.training
    try:
        yield saved
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved):
                tensor.copy_(value)
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


def _as_directions(model: nn.Module, directions) -> Directions:
    if isinstance(directions, Directions):
        return directions
    vectors = [list(vector) for vector in directions]  # a tuple of per-parameter lists
    return Directions([name for name, _ in model.named_parameters()], vectors, "custom")


def loss_landscape(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    noise_range: float | tuple[float, float] = 1.0,
    resolution: int = 21,
    dims: int = 2,
    y_range: float | tuple[float, float] | None = None,
    directions: Directions | tuple[list[torch.Tensor], ...] | None = None,
    normalization: str = "filter",
    ignore: str = "biasbn",
    include_buffers: bool = False,
    seed: int = 0,
    compile: bool | None = False,
    channels_last: bool | None = None,
    progress: bool = True,
    resume: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    on_point: Callable[[tuple[int, ...], float, float], None] | None = None,
    on_start: Callable[[dict[str, bool]], None] | None = None,
) -> LandscapeResult:
    """Evaluate loss and accuracy on a line (``dims=1``) or plane (``dims=2``) through the weights.

    Args:
        model: evaluated in eval mode. Its parameters (and buffers, if the
            directions move them) are set in place per point and restored
            bit-exactly afterwards, also when an exception or Ctrl-C stops the loop.
        batches: evaluation (inputs, targets) batches, already on the model's device.
        loss_fn: mean-reduced loss, e.g. ``nn.CrossEntropyLoss()``; the landscape
            weights each batch by its size.
        noise_range: x coordinates, ``r`` for ``[-r, r]`` or ``[min, max]``;
            ``y_range`` likewise for y (default: the same).
        resolution: points per axis.
        directions: a ``Directions`` (random, target or PCA), or a tuple of
            per-parameter tensor lists; default: ``dims`` random directions from
            ``seed`` with ``normalization``, ``ignore`` and ``include_buffers``.
        compile: ``True`` compiles the forward pass with ``torch.compile``;
            ``None`` decides by the amount of work; ``False`` (default) stays eager.
            NOTE: with a compiled forward pass, Ctrl-C was once seen to be ignored
            until the grid finished (torch 2.13, CPU, ResNet-8 in a plain Python
            process). Through the CLI it stops a compiled run of a small CNN
            within 2 s, during compilation and between points.
        channels_last: store 4D inputs and weights in channels-last order while
            evaluating (oneDNN convolutions on CPU run faster so); ``None``
            (default) turns it on for a CPU model with 4D weights and 4D inputs.
        resume: (loss, accuracy, done) of an interrupted run; points marked done
            are kept, not recomputed.
        on_point: called as ``on_point(index, loss, accuracy)`` after each point
            this process evaluates (``index`` is ``(j,)`` or ``(i, j)``).
        on_start: called once before the first point with the chosen
            ``{"compiled": ..., "channels_last": ...}``. Both change the
            losses in the last digits, so a resumed run should pass the same
            values to end bit-identical to an uninterrupted one.

    Under ``torchrun`` each rank evaluates its share of the points and every rank
    returns the full grid, equal to the single-process result.

    Example::

        result = loss_landscape(model, [(x, y)], nn.CrossEntropyLoss(), noise_range=1.0, resolution=11)
        result.loss  # [11, 11] float64
    """
    batches = list(batches)
    if dims not in (1, 2):
        raise VizpipeError(f"invalid landscape dims {dims}: use 1 or 2")
    if directions is None:
        directions = random_directions(model, dims, seed, normalization, ignore, include_buffers)
    directions = _as_directions(model, directions)
    include_buffers = any(name not in dict(model.named_parameters()) for name in directions.names)
    entries = state_entries(model, include_buffers)
    check_fits(entries, directions, dims)
    tensors = [tensor for _, tensor in entries]
    directions_on_device = directions.to(tensors)

    x = coordinates(noise_range, resolution)
    y = coordinates(noise_range if y_range is None else y_range, resolution) if dims == 2 else None
    shape = (len(x),) if dims == 1 else (len(y), len(x))
    loss = torch.full(shape, float("nan"), dtype=torch.float64)
    accuracy = torch.full(shape, float("nan"), dtype=torch.float64)
    done = torch.zeros(shape, dtype=torch.bool)
    if resume is not None:
        previous_loss, previous_accuracy, previous_done = resume
        if tuple(previous_done.shape) != shape:
            raise VizpipeError(f"cannot resume a landscape of shape {list(previous_done.shape)} as {list(shape)}")
        loss[previous_done] = previous_loss[previous_done].double()
        accuracy[previous_done] = previous_accuracy[previous_done].double()
        done |= previous_done.bool()

    all_points = list(_grid_points(shape))
    mine = [all_points[k] for k in distributed.shard(len(all_points))]
    todo = [index for index in mine if not done[index]]
    if channels_last is None:
        channels_last = (
            tensors[0].device.type == "cpu"
            and any(t.dim() == 4 for t in tensors)
            and all(inputs.dim() == 4 for inputs, _ in batches)
        )
    channels_last = _same_on_all_ranks(channels_last)
    vectors = directions_on_device.vectors
    if channels_last:
        batches = [(_channels_last(inputs), targets) for inputs, targets in batches]
        vectors = [[_channels_last(v) for v in vector] for vector in vectors]
    layout = channels_last_weights(model) if channels_last else nullcontext()
    # The layout context swaps each 4D parameter's storage for a channels-last
    # copy and puts the original back on exit, so the grid loop never writes to
    # the original storage, and restored_state then restores the values exactly.
    with restored_state(model, tensors) as base, layout:
        model.eval()
        if channels_last:
            base = [_channels_last(b) for b in base]
        started = time.perf_counter()
        base_loss, base_accuracy, count = evaluate(model, batches, loss_fn)
        estimate = (time.perf_counter() - started) * len(todo)
        if compile is None:
            compile = estimate > COMPILE_MIN_SECONDS
            log.info(
                "Landscape: %d points, about %.0f s eager; %s", len(todo), estimate,
                "compiling the forward pass" if compile else "running eagerly",
            )
        # Ranks that timed differently must still agree, or their shares of the grid would differ from one process's.
        compile = _same_on_all_ranks(compile)
        if on_start is not None:
            on_start({"compiled": bool(compile), "channels_last": bool(channels_last)})
        forward = torch.compile(model, dynamic=False) if compile else model
        bar = tqdm(
            total=len(mine), initial=len(mine) - len(todo), desc="loss landscape",
            disable=None if progress else True, unit="point",
        )
        local_loss = torch.zeros(shape, dtype=torch.float64)
        local_accuracy = torch.zeros(shape, dtype=torch.float64)
        local_done = torch.zeros(shape, dtype=torch.bool)
        # Moving BatchNorm statistics linearly past a checkpoint (interpolation
        # beyond alpha = 1, say) can make a running variance negative, which
        # BatchNorm turns into NaN; such variances are clamped to 0 (BatchNorm adds eps).
        variances = [tensor for name, tensor in entries if name.endswith("running_var")]
        clamped_points = 0
        try:
            for index in todo:
                _move(tensors, base, vectors, _point_coordinates(index, x, y))
                if variances and _clamp_negative(variances):
                    clamped_points += 1
                point_loss, point_accuracy, _ = evaluate(forward, batches, loss_fn)
                local_loss[index], local_accuracy[index], local_done[index] = point_loss, point_accuracy, True
                if on_point is not None:
                    on_point(index, point_loss, point_accuracy)
                bar.update()
        finally:
            bar.close()

    if distributed.world_size() > 1:
        clamped_points = int(distributed.all_reduce_sum(torch.tensor([float(clamped_points)], dtype=torch.float64)).item())
        distributed.all_reduce_sum(local_loss)
        distributed.all_reduce_sum(local_accuracy)
        counts = distributed.all_reduce_sum(local_done.to(torch.int32))
        local_done = counts > 0
    if clamped_points:
        log.warning(
            "Landscape: at %d point(s) a moved BatchNorm running variance was negative and was clamped to 0; "
            "those points lie beyond the range where the moved statistics are valid",
            clamped_points,
        )
    loss[local_done] = local_loss[local_done]
    accuracy[local_done] = local_accuracy[local_done]
    done |= local_done

    return LandscapeResult(
        x=x,
        y=y,
        loss=loss,
        accuracy=accuracy,
        done=done,
        base_loss=base_loss,
        base_accuracy=base_accuracy,
        num_samples=count,
        directions=Directions(
            directions.names, [[d.detach().cpu() for d in v] for v in directions.vectors],
            directions.kind, directions.extras,
        ),
        settings={
            "dims": dims, "normalization": normalization, "ignore": ignore, "seed": seed, "compiled": bool(compile),
            "channels_last": bool(channels_last), "clamped_variance_points": clamped_points,
        },
    )


def _grid_points(shape: tuple[int, ...]):
    if len(shape) == 1:
        for j in range(shape[0]):
            yield (j,)
    else:
        for i in range(shape[0]):
            for j in range(shape[1]):
                yield (i, j)


def _point_coordinates(index: tuple[int, ...], x: torch.Tensor, y: torch.Tensor | None) -> list[float]:
    if len(index) == 1:
        return [float(x[index[0]])]
    return [float(x[index[1]]), float(y[index[0]])]


@torch.no_grad()
def _clamp_negative(tensors: list[torch.Tensor]) -> bool:
    """Clamp negative entries of ``tensors`` to 0 in place; return whether there were any."""
    negative = any(bool((tensor < 0).any()) for tensor in tensors)
    if negative:
        for tensor in tensors:
            tensor.clamp_(min=0)
    return negative


def _same_on_all_ranks(flag: bool) -> bool:
    """Return rank 0's ``flag`` on every torchrun rank (``flag`` itself in a single process)."""
    if distributed.world_size() == 1:
        return bool(flag)
    return bool(distributed.broadcast(torch.tensor([int(flag)])).item())


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


@torch.no_grad()
def _move(tensors: list[torch.Tensor], base: list[torch.Tensor], vectors: list[list[torch.Tensor]], amounts: list[float]) -> None:
    """Set ``tensors = base + sum_k amounts[k] * vectors[k]`` in place."""
    torch._foreach_copy_(tensors, base)
    for vector, amount in zip(vectors, amounts):
        torch._foreach_add_(tensors, vector, alpha=amount)
