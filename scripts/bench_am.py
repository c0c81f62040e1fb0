"""Benchmark activation maximization against a plain one-channel-at-a-time loop.

The reference optimizes one channel at a time the way the tool vizpipe replaced
did: a new forward hook on the layer per channel, a full forward pass through
the model, and the model's parameters left trainable, so every backward pass
also computes weight gradients. vizpipe optimizes all channels of the layer in
one batch and stops the forward pass at the layer. Both use the same model
(a seeded ResNet-8 in eval mode), start images, Adam step size, TV weight and
clamping. Each repeat times both, and the script prints the median ratio.

    .venv/bin/python scripts/bench_am.py                      # CPU, 100 iterations, 3 repeats
    .venv/bin/python scripts/bench_am.py --device cuda --iterations 1000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from vizpipe.analyses import activation_maximization
from vizpipe.analyses.activation_maximization import total_variation
from vizpipe.analyses.modules import find_layer
from vizpipe.models import resnet8

MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def reference(model, layer, channels, starts, iterations, lr, tv_weight, mean, std):
    """One channel at a time: new hook, full forward pass, weight gradients computed."""
    module = find_layer(model, layer)
    finals = []
    for channel, start in zip(channels, starts):
        captured = {}
        handle = module.register_forward_hook(lambda _m, _i, output: captured.__setitem__("output", output))
        pixels = start.clone().unsqueeze(0).requires_grad_(True)
        optimizer = torch.optim.Adam([pixels], lr=lr)
        for _ in range(iterations):
            optimizer.zero_grad()
            model((pixels - mean) / std)
            activation = captured["output"][0, channel].mean()
            loss = -activation + tv_weight * total_variation(pixels).sum()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0.0, 1.0)
        handle.remove()
        finals.append(pixels.detach())
    model.zero_grad(set_to_none=True)
    return torch.cat(finals)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--iterations", type=int, default=100, help="Adam steps per channel (default: 100)")
    parser.add_argument("--channels", type=int, default=64, help="channels per layer, 0..N-1 (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default: 3)")
    parser.add_argument("--layers", nargs="+", default=["pre_conv", "layers.2.0.conv2"])
    parser.add_argument("--compile", action="store_true",
                        help="also time vizpipe with compile=True (compilation time reported apart)")
    parser.add_argument("--no-reference", action="store_true",
                        help="time only the vizpipe variants (to compare them with each other)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = resnet8(input_channel=3, class_number=10).to(device).eval()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    channels = list(range(args.channels))
    settings = dict(iterations=args.iterations, lr=0.1, tv_weight=1.0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}")
    print(f"{args.channels} channels x {args.iterations} iterations, lr 0.1, TV weight 1, 3x32x32, ResNet-8")

    variants = {"vizpipe": {}, "vizpipe contiguous": {"channels_last": False}}
    if args.compile:
        variants["vizpipe compiled"] = {"compile": True}
    for layer in args.layers:
        options = dict(
            channels=channels, mean=MEAN, std=STD, init_std=0.1, clamp=True, frame_every=args.iterations,
            batch_size=args.channels, seed=0, progress=False, **settings,
        )
        # Warm-up: the first call allocates memory and, with compilation, compiles.
        first_call = {}
        for name, extra in variants.items():
            started = time.perf_counter()
            warm = activation_maximization(model, layer, [3, 32, 32], **options, **extra)
            synchronize(device)
            first_call[name] = time.perf_counter() - started
        starts = warm.frames[0].to(device=device, dtype=torch.float32) / 255.0
        reference(model, layer, channels[:1], starts[:1], 2, 0.1, 1.0, mean, std)

        times = {name: [] for name in ["reference", *variants]}
        for _ in range(args.repeats):
            for name, extra in variants.items():
                synchronize(device)
                started = time.perf_counter()
                activation_maximization(model, layer, [3, 32, 32], **options, **extra)
                synchronize(device)
                times[name].append(time.perf_counter() - started)
            if args.no_reference:
                continue
            started = time.perf_counter()
            reference(model, layer, channels, starts, args.iterations, 0.1, 1.0, mean, std)
            synchronize(device)
            times["reference"].append(time.perf_counter() - started)

        if args.no_reference:
            times["reference"] = [float("nan")] * args.repeats
        reference_median = statistics.median(times["reference"])
        print(f"{layer}: reference {reference_median:.2f} s "
              f"({1e3 * reference_median / args.iterations / args.channels:.2f} ms per channel and step)")
        for name in variants:
            ratios = [r / v for r, v in zip(times["reference"], times[name])]
            median = statistics.median(times[name])
            print(f"  {name:>20}: {median:6.2f} s ({1e3 * median / args.iterations:.1f} ms per step of "
                  f"{args.channels} channels; first call {first_call[name]:.1f} s), speed-up median "
                  f"{statistics.median(ratios):.1f}x (repeats: {', '.join(f'{r:.1f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
