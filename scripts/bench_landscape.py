"""Benchmark the loss-landscape loop against a plain reference and the forward-pass floor.

Measured in one run on the same model (ResNet-8 of the reference layout), data
and directions:
- reference: the straightforward loop (deep copy of the model per point, weights
  rebuilt through load_state_dict, a DataLoader over per-sample dicts);
- vizpipe: ``loss_landscape`` with its defaults (channels-last on CPU,
  compilation decided by the estimated eager time, compile time included), and
  the variants chosen with ``--variants``;
- floor: resolution^2 x one eager forward pass of the evaluation set (the
  median of 5 passes);
- the arithmetic: floating-point operations of one pass over the evaluation
  set (``torch.utils.flop_counter``), the rate each method reached, and the
  time of the model's convolutions alone, each run on its own in its faster
  memory layout: a lower bound for any float32 evaluation of the grid that
  uses these convolution kernels;
- with ``--vmap-points K``: seconds per grid point when K points share one
  forward pass (``torch.func.functional_call`` + ``torch.vmap`` over stacked
  weights), against the plain loop over the same points.

Prints a Markdown table with medians over ``--repeats`` runs and checks that
vizpipe's values equal the reference's within 1e-5 relative.

    python scripts/bench_landscape.py                 # 1,000 inputs, 31x31 grid
    python scripts/bench_landscape.py --quick         # 200 inputs, 7x7 grid
    python scripts/bench_landscape.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from vizpipe.analyses import loss_landscape
from vizpipe.analyses.directions import random_directions
from vizpipe.analyses.landscape import coordinates
from vizpipe.models import resnet8


# Settings of loss_landscape timed besides its defaults, chosen with --variants.
VARIANTS = {
    "compile=True": {"compile": True},
    "eager": {"compile": False},
    "eager,channels_last=False": {"compile": False, "channels_last": False},
}


def reference_landscape(model, x, y, directions, xs, ys, batch_size):
    """Evaluate the grid with the straightforward loop that vizpipe replaces."""
    samples = [{"image": x[i], "label": y[i]} for i in range(len(x))]
    loader = DataLoader(samples, batch_size=batch_size, shuffle=False)
    base = {name: value.clone() for name, value in model.state_dict().items()}
    criterion = nn.CrossEntropyLoss()
    losses = torch.zeros(len(ys), len(xs), dtype=torch.float64)
    for i, b in enumerate(ys.tolist()):
        for j, a in enumerate(xs.tolist()):
            moved = copy.deepcopy(model)
            state = {name: value.clone() for name, value in base.items()}
            for name, d1, d2 in zip(directions.names, *directions.vectors):
                state[name] = base[name] + a * d1 + b * d2
            moved.load_state_dict(state)
            moved.eval()
            total, count = 0.0, 0
            with torch.no_grad():
                for batch in loader:
                    outputs = moved(batch["image"])
                    total += criterion(outputs, batch["label"]).item() * len(batch["label"])
                    count += len(batch["label"])
            losses[i, j] = total / count
    return losses


def floor_seconds(model, batches, points, passes: int = 5):
    """Return ``points`` x the median time of one eager forward pass over ``batches`` (after a warm-up pass)."""
    model.eval()
    times = []
    with torch.no_grad():
        for inputs, _ in batches:  # warm-up
            model(inputs)
        for _ in range(passes):
            started = time.perf_counter()
            for inputs, _ in batches:
                model(inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * points


def vmap_seconds(model, batches, directions, xs, chunk: int, rows: int = 2) -> dict[str, float]:
    """Seconds per grid point over ``rows`` grid rows: ``chunk`` points per vmapped forward pass, and a plain loop."""
    model.eval()
    names = directions.names
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    base = {name: parameters[name].detach() for name in names}
    first, second = ({n: v for n, v in zip(names, vector)} for vector in directions.to(list(parameters.values())).vectors)
    points = [(a, b) for b in xs[:rows].tolist() for a in xs.tolist()]

    def weights(point):
        a, b = point
        return {name: base[name] + a * first[name] + b * second[name] for name in names}

    def forward(weights_of_point, inputs):
        return functional_call(model, (weights_of_point, buffers), (inputs,))

    batched = torch.vmap(forward, in_dims=(0, None))
    loss_fn = nn.CrossEntropyLoss()
    with torch.inference_mode():
        started = time.perf_counter()
        for start in range(0, len(points), chunk):
            group = [weights(point) for point in points[start : start + chunk]]
            stacked = {name: torch.stack([g[name] for g in group]) for name in names}
            for inputs, targets in batches:
                outputs = batched(stacked, inputs)
                [loss_fn(output, targets) for output in outputs]
        vmapped = (time.perf_counter() - started) / len(points)
        started = time.perf_counter()
        for point in points:
            moved = weights(point)
            for inputs, targets in batches:
                loss_fn(forward(moved, inputs), targets)
        looped = (time.perf_counter() - started) / len(points)
    return {"vmap": vmapped, "loop": looped}


def pass_flops(model, batches) -> int:
    """Return the floating-point operations of one forward pass over ``batches``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    return counter.get_total_flops()


def convolution_seconds(model, batches, repeats: int = 5) -> float:
    """Return the time of one pass over ``batches`` that only runs the model's convolutions, each at its best.

    Each Conv2d runs alone on its recorded input, in the contiguous and the
    channels-last layout, and the faster median of ``repeats`` counts. The sum
    leaves out every other layer, so no evaluation of the model in float32
    with these convolution kernels can be faster.
    """
    calls = []

    def record(module, inputs, output):
        calls.append((module, inputs[0].detach().clone()))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()

    total = 0.0
    with torch.no_grad():
        for module, inputs in calls:
            best = math.inf
            for layout in (torch.contiguous_format, torch.channels_last):
                weight = module.weight.detach().contiguous(memory_format=layout)
                bias = None if module.bias is None else module.bias.detach()
                moved = inputs.contiguous(memory_format=layout)

                def convolve():
                    return torch.nn.functional.conv2d(moved, weight, bias, module.stride, module.padding,
                                                      module.dilation, module.groups)

                convolve()  # warm-up
                times = []
                for _ in range(repeats):
                    synchronize(inputs.device)
                    started = time.perf_counter()
                    convolve()
                    synchronize(inputs.device)
                    times.append(time.perf_counter() - started)
                best = min(best, statistics.median(times))
            total += best
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function):
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="evaluation inputs (3x32x32)")
    parser.add_argument("--resolution", type=int, default=31, help="grid points per axis")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method; medians are reported")
    parser.add_argument("--quick", action="store_true", help="200 inputs, 7x7 grid, 3 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants", nargs="*", default=["compile=True"], choices=sorted(VARIANTS),
        help="vizpipe settings timed besides the default",
    )
    parser.add_argument("--vmap-points", type=int, default=0, help="grid points per vmapped forward pass; 0: skip")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.resolution, args.repeats = 200, 7, 3

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet8(3, 10).to(device).eval()
    x = torch.randn(args.samples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.samples,), device=device)
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size)))
    directions = random_directions(model, dims=2, seed=0)
    xs = coordinates(1.0, args.resolution)
    points = args.resolution**2

    labels = ["vizpipe default", *(f"vizpipe {variant}" for variant in args.variants)]
    times = {"reference": [], **{label: [] for label in labels}, "floor": []}
    values, settings = {}, {}
    for _ in range(args.repeats):
        seconds, values["reference"] = timed(
            lambda: reference_landscape(model, x, y, directions.to(list(model.parameters())), xs, xs, args.batch_size)
        )
        times["reference"].append(seconds)
        for label, options in zip(labels, [{}, *(VARIANTS[variant] for variant in args.variants)]):
            torch._dynamo.reset()  # count compilation in every run
            seconds, result = timed(
                lambda: loss_landscape(
                    model, batches, nn.CrossEntropyLoss(), resolution=args.resolution, directions=directions,
                    progress=False, **{"compile": None, **options},
                )
            )
            times[label].append(seconds)
            values[label] = result.loss
            settings[label] = {key: result.settings[key] for key in ("compiled", "channels_last")}
        times["floor"].append(floor_seconds(model, batches, points))

    medians = {label: statistics.median(seconds) for label, seconds in times.items()}
    for label in labels:
        print(f"{label}: {settings[label]}")
    for label in labels:
        error = ((values[label] - values["reference"]).abs() / values["reference"].abs()).max().item()
        print(f"max relative difference {label} vs reference: {error:.2e}")
    print(f"\nResNet-8, {args.samples} inputs, {args.resolution}x{args.resolution} grid, device {device}, "
          f"{os.cpu_count()} logical CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"median of {args.repeats} run(s)\n")
    flops = pass_flops(model, batches) * points
    bound = convolution_seconds(model, batches) * points
    print("| method | seconds | reference / method | method / floor | GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for label, seconds in medians.items():
        print(f"| {label} | {seconds:.1f} | {medians['reference'] / seconds:.2f}x | {seconds / medians['floor']:.2f} "
              f"| {flops / seconds / 1e9:.0f} |")
    print(f"\n{flops / points / 1e9:.2f} GFLOP per grid point. The convolutions alone, each in its faster layout, "
          f"take {bound:.1f} s for the grid ({flops / bound / 1e9:.0f} GFLOP/s): "
          f"{medians['reference'] / bound:.2f}x faster than the reference and {bound / medians['floor']:.2f} of the floor.")
    if args.vmap_points:
        per_point = vmap_seconds(model, batches, directions, xs, args.vmap_points)
        print(f"\nseconds per grid point, eager: {args.vmap_points} points per vmapped forward pass "
              f"{per_point['vmap']:.3f}, plain loop {per_point['loop']:.3f}")


if __name__ == "__main__":
    main()
