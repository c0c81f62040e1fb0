"""Benchmark the loss-landscape loop against a plain reference and the forward-pass floor.

Measured in one run on the same model (ResNet-8 of the reference layout), data
and directions:
- reference: the straightforward loop (deep copy of the model per point, weights
  rebuilt through load_state_dict, a DataLoader over per-sample dicts);
- vizpipe: ``loss_landscape`` with its defaults (compilation decided by the
  estimated eager time, compile time included) and with ``compile=True``;
- floor: resolution^2 x one eager forward pass of the evaluation set.

Prints a Markdown table with medians over ``--repeats`` runs and checks that
vizpipe's values equal the reference's within 1e-5 relative.

    python scripts/bench_landscape.py                 # 1,000 inputs, 31x31 grid
    python scripts/bench_landscape.py --quick         # 200 inputs, 7x7 grid
    python scripts/bench_landscape.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from vizpipe.analyses import loss_landscape
from vizpipe.analyses.directions import random_directions
from vizpipe.analyses.landscape import coordinates
from vizpipe.models import resnet8


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


def floor_seconds(model, batches, points):
    model.eval()
    with torch.no_grad():
        for inputs, _ in batches:  # warm-up
            model(inputs)
        started = time.perf_counter()
        for inputs, _ in batches:
            model(inputs)
    return (time.perf_counter() - started) * points


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

    times = {"reference": [], "vizpipe default": [], "vizpipe compile=True": [], "floor": []}
    values = {}
    for _ in range(args.repeats):
        seconds, values["reference"] = timed(
            lambda: reference_landscape(model, x, y, directions.to(list(model.parameters())), xs, xs, args.batch_size)
        )
        times["reference"].append(seconds)
        for label, compile_option in (("vizpipe default", None), ("vizpipe compile=True", True)):
            torch._dynamo.reset()  # count compilation in every run
            seconds, result = timed(
                lambda: loss_landscape(
                    model, batches, nn.CrossEntropyLoss(), resolution=args.resolution, directions=directions,
                    compile=compile_option, progress=False,
                )
            )
            times[label].append(seconds)
            values[label] = result.loss
        times["floor"].append(floor_seconds(model, batches, points))

    medians = {label: statistics.median(seconds) for label, seconds in times.items()}
    for label in ("vizpipe default", "vizpipe compile=True"):
        error = ((values[label] - values["reference"]).abs() / values["reference"].abs()).max().item()
        print(f"max relative difference {label} vs reference: {error:.2e}")
    print(f"\nResNet-8, {args.samples} inputs, {args.resolution}x{args.resolution} grid, device {device}, "
          f"{os.cpu_count()} logical CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"median of {args.repeats} run(s)\n")
    print("| method | seconds | reference / method | method / floor |")
    print("| --- | --- | --- | --- |")
    for label, seconds in medians.items():
        print(f"| {label} | {seconds:.1f} | {medians['reference'] / seconds:.2f}x | {seconds / medians['floor']:.2f} |")


if __name__ == "__main__":
    main()
