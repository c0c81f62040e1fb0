"""Benchmark per-block Hessian eigenvalues: vizpipe against a plain per-block power-iteration loop.

On ResNet-8 (29 parameter tensors) with CIFAR-shaped inputs, one run measures:

1. a long Lanczos run per block from random start vectors, the reference
   eigenvalues;
2. vizpipe (lockstep Lanczos from random start vectors, one gradient graph
   reused for every product, blocks stopping on their own): products, time
   and the worst relative error;
3. the plain loop: for each block in turn, power iteration that rebuilds the
   gradient graph for every product and stops as soon as its estimate is within
   ``--accuracy`` of the reference (an oracle stop, which favours the loop), or
   with ``--plain-tol`` when its estimate changes by less than that, as a real
   loop must (the oracle's product count is then reported as well);
4. the time of one Hessian-vector product by double backward (graph reused),
   by double backward with a fresh graph, and by forward-over-reverse
   (``torch.func.jvp`` of ``torch.func.grad``);
5. the peak memory of vizpipe's products over ``--memory-inputs`` inputs in
   batches of ``--batch-size``, each size in a fresh process, with glibc's
   default malloc and (on CPU) with a 64 KiB mmap threshold, so that freed
   tensors go back to the system at once.

Example: python scripts/bench_hessian.py --inputs 100 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.models import resnet8


def build_problem(inputs: int, device: torch.device, seed: int = 0):
    """ResNet-8 in eval mode with seeded weights, Gaussian CIFAR-shaped inputs and random labels."""
    torch.manual_seed(seed)
    model = resnet8(input_channel=3, class_number=10).to(device).eval()
    x = torch.randn(inputs, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (inputs,), device=device)
    return model, x, y


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_power_iteration(model, x, y, reference: dict[str, float], accuracy: float, max_iterations: int, device,
                          tol: float | None = None):
    """Run power iteration on one block after another, with a new graph for every product; return counts and times.

    With ``tol=None`` a block stops as soon as its estimate is within
    ``accuracy`` of the reference (an oracle stop). With a ``tol`` it stops, as
    a real loop must, when the estimate changes by less than ``tol`` relative.
    The product at which the oracle stop would have come is still recorded.
    """
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1)
    products, oracle_products, missed, errors = 0, 0, [], {}
    synchronize(device)
    started = time.perf_counter()
    for name, parameter in model.named_parameters():
        vector = torch.randn(parameter.shape, generator=generator).to(parameter)
        vector /= vector.norm()
        previous, oracle_step = math.nan, None
        for step in range(1, max_iterations + 1):
            loss = loss_fn(model(x), y)
            (gradient,) = torch.autograd.grad(loss, parameter, create_graph=True)
            (product,) = torch.autograd.grad(gradient, parameter, vector)
            products += 1
            estimate = float(torch.dot(vector.flatten(), product.flatten()))
            vector = product / product.norm()
            within = abs(estimate - reference[name]) <= accuracy * abs(reference[name])
            if within and oracle_step is None:
                oracle_step = step
            if tol is None and within:
                break
            if tol is not None and not math.isnan(previous) and abs(estimate - previous) <= tol * abs(estimate):
                break
            previous = estimate
        errors[name] = abs(estimate - reference[name]) / max(abs(reference[name]), 1e-30)
        if oracle_step is None:
            missed.append(name)
        else:
            oracle_products += oracle_step
    synchronize(device)
    return {"products": products, "seconds": time.perf_counter() - started, "stop": "oracle" if tol is None else f"change < {tol:g}",
            "oracle_products": oracle_products if not missed else None, "max_relative_error": max(errors.values()),
            "blocks_not_within_accuracy": missed if tol is None else [n for n, e in errors.items() if e > accuracy]}


def time_product_modes(model, x, y, block: str, repeats: int, device) -> dict[str, float]:
    """Median seconds of one ``H_bb v`` for ``block`` by three autograd routes."""
    loss_fn = nn.CrossEntropyLoss()
    parameters = dict(model.named_parameters())
    parameter = parameters[block]
    vector = torch.randn_like(parameter)
    others = {name: p.detach() for name, p in parameters.items() if name != block}
    buffers = dict(model.named_buffers())

    def block_loss(value):
        return loss_fn(functional_call(model, ({**others, block: value}, buffers), (x,)), y)

    def reuse():
        return torch.autograd.grad(gradient, parameter, vector, retain_graph=True)[0]

    def rebuild():
        (fresh,) = torch.autograd.grad(loss_fn(model(x), y), parameter, create_graph=True)
        return torch.autograd.grad(fresh, parameter, vector)[0]

    def forward_over_reverse():
        return jvp(grad(block_loss), (parameter.detach(),), (vector,))[1]

    (gradient,) = torch.autograd.grad(loss_fn(model(x), y), parameter, create_graph=True)
    results, values = {}, {}
    for label, function in (("double_backward_reused_graph", reuse), ("double_backward_new_graph", rebuild),
                            ("forward_over_reverse", forward_over_reverse)):
        function()  # warm-up: the first torch.func call traces and allocates
        times = []
        for _ in range(repeats):
            synchronize(device)
            started = time.perf_counter()
            values[label] = function()
            synchronize(device)
            times.append(time.perf_counter() - started)
        results[label] = statistics.median(times)
    # The three routes must agree, or the timing compares different things.
    base = values["double_backward_reused_graph"]
    for label, value in values.items():
        error = float((value - base).norm() / base.norm())
        if error > 1e-3:
            raise RuntimeError(f"{label} differs from double backward by {error:.2g} relative")
    return results


def peak_memory_child(inputs: int, batch_size: int, include: list[str] | None, device: torch.device) -> None:
    """Print the peak memory (MB) above the starting point of two Lanczos steps on the included blocks."""
    model, x, y = build_problem(inputs, device)
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident set size
        start = _proc_status_kb("VmRSS") * 1024
    hessian_block_eigenvalues(model, batches, nn.CrossEntropyLoss(), method="lanczos", max_iterations=2,
                              include=include, progress=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _proc_status_kb("VmHWM") * 1024
    print(json.dumps({"inputs": inputs, "peak_mb_above_start": (peak - start) / 1e6}))


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--inputs", type=int, default=100, help="evaluation inputs (one batch)")
    parser.add_argument("--accuracy", type=float, default=1e-3, help="relative accuracy every block must reach")
    parser.add_argument("--tol", type=float, default=1e-4, help="vizpipe's stopping tolerance (relative change)")
    parser.add_argument("--reference-iterations", type=int, default=80, help="Lanczos steps of the reference run")
    parser.add_argument("--reference-tol", type=float, default=1e-6, help="stopping tolerance of the reference run")
    parser.add_argument("--max-plain-iterations", type=int, default=200, help="products per block for the plain loop")
    parser.add_argument("--memory-inputs", type=int, nargs="*", default=[100, 1000], help="input counts for peak memory")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size of the memory measurement")
    parser.add_argument("--memory-include", nargs="*", help="parameter patterns of the memory run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per product route")
    parser.add_argument("--skip-plain", action="store_true", help="skip the plain loop (the slowest part)")
    parser.add_argument("--plain-tol", type=float,
                        help="stop the plain loop when its estimate changes by less than this (relative), as a real "
                             "loop must; default: stop when it is within --accuracy of the reference (oracle)")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.memory_child is not None:
        peak_memory_child(args.memory_child, args.batch_size, args.memory_include, device)
        return

    report: dict = {"device": str(device), "threads": torch.get_num_threads(), "inputs": args.inputs}
    model, x, y = build_problem(args.inputs, device)
    loss_fn = nn.CrossEntropyLoss()

    print("reference: long Lanczos run ...", file=sys.stderr)
    reference_run = hessian_block_eigenvalues(model, [(x, y)], loss_fn, method="lanczos",
                                              max_iterations=args.reference_iterations, tol=args.reference_tol, seed=7,
                                              progress=False)
    reference = dict(zip(reference_run.block_names, reference_run.eigenvalues.tolist()))
    report["reference"] = {"products": int(reference_run.iterations.sum()),
                           "max_residual": float(reference_run.residuals.max()),
                           "not_converged": reference_run.not_converged}

    print("vizpipe: lockstep Lanczos ...", file=sys.stderr)
    synchronize(device)
    started = time.perf_counter()
    fast = hessian_block_eigenvalues(model, [(x, y)], loss_fn, method="lanczos", max_iterations=args.reference_iterations,
                                     tol=args.tol, seed=0, progress=False)
    synchronize(device)
    errors = {name: abs(value - reference[name]) / max(abs(reference[name]), 1e-30)
              for name, value in zip(fast.block_names, fast.eigenvalues.tolist())}
    report["vizpipe"] = {"products": int(fast.iterations.sum()), "seconds": time.perf_counter() - started,
                         "max_relative_error": max(errors.values()),
                         "blocks_not_within_accuracy": [n for n, e in errors.items() if e > args.accuracy]}

    if not args.skip_plain:
        print("plain loop: per-block power iteration ...", file=sys.stderr)
        report["plain_loop"] = plain_power_iteration(model, x, y, reference, args.accuracy,
                                                     args.max_plain_iterations, device, args.plain_tol)
        plain = report["plain_loop"]
        report["ratio_products"] = plain["products"] / report["vizpipe"]["products"]
        report["ratio_seconds"] = plain["seconds"] / report["vizpipe"]["seconds"]
        if plain["oracle_products"]:
            report["ratio_oracle_products"] = plain["oracle_products"] / report["vizpipe"]["products"]

    print("product routes ...", file=sys.stderr)
    report["seconds_per_product"] = time_product_modes(model, x, y, "layers.1.0.conv1.weight", args.repeats, device)

    report["peak_memory"] = []
    # glibc's malloc keeps freed heap blocks for reuse, so the default resident peak
    # also counts memory that no tensor uses any more. With a 64 KiB mmap threshold,
    # larger blocks are mapped and returned to the system on free (glibc manual,
    # "Malloc Tunable Parameters"), and the peak follows the live tensors.
    allocators = {"default malloc": {}}
    if device.type == "cpu":
        allocators["MALLOC_MMAP_THRESHOLD_=65536"] = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    for inputs in args.memory_inputs:
        for allocator, extra in allocators.items():
            print(f"peak memory with {inputs} inputs, {allocator} ...", file=sys.stderr)
            command = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
                       "--memory-child", str(inputs)]
            if args.memory_include:
                command += ["--memory-include", *args.memory_include]
            output = subprocess.run(command, check=True, capture_output=True, text=True,
                                    env={**os.environ, **extra}).stdout
            report["peak_memory"].append({"allocator": allocator, **json.loads(output.strip().splitlines()[-1])})

    print(json.dumps(report, indent=2, default=lambda value: None if isinstance(value, float) and math.isnan(value) else value))


if __name__ == "__main__":
    main()
