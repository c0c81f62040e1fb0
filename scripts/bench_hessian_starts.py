"""Measure how often one start vector converges to a non-dominant block eigenvalue, and what verifying catches.

For each seed, three digits models get per-block dominant eigenvalues by
Lanczos with ``--tol``: a small CNN at initialization, the same CNN trained
for 5 epochs, and a ResNet-8 trained for 2 epochs. Each model runs once from
one random start per block and once verified by a second random start
(``verify=True``). A long Lanczos run from other random starts
(``--reference-tol``) is the reference. A block misses when its value is
further than ``--accuracy`` from it, relative. The script prints misses,
products and the blocks that verifying flagged.

Example: python scripts/bench_hessian_starts.py --seeds 12
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.data.digits import digits
from vizpipe.models import resnet8
from vizpipe.models.small import SmallCNN


def train(model: nn.Module, data, epochs: int) -> nn.Module:
    """Plain SGD with momentum on the digits training split."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            optimizer.zero_grad()
            loss_fn(model(data.x_train[index]), data.y_train[index]).backward()
            optimizer.step()
    return model.eval()


def models(seed: int, data):
    torch.manual_seed(seed)
    yield "small_cnn init", SmallCNN(input_channel=1, class_number=10).eval()
    torch.manual_seed(seed)
    yield "small_cnn trained", train(SmallCNN(input_channel=1, class_number=10), data, 5)
    torch.manual_seed(seed)
    yield "resnet8 trained", train(resnet8(input_channel=1, class_number=10), data, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0 .. seeds-1, each for all three models")
    parser.add_argument("--inputs", type=int, default=200, help="test inputs the Hessian is taken over")
    parser.add_argument("--tol", type=float, default=1e-3, help="Lanczos tolerance of the runs measured")
    parser.add_argument("--accuracy", type=float, default=1e-3, help="relative error that counts as a miss")
    parser.add_argument("--reference-tol", type=float, default=1e-7, help="tolerance of the reference run")
    args = parser.parse_args()

    data = digits()
    x, y = data.x_test[: args.inputs], data.y_test[: args.inputs]
    loss_fn = nn.CrossEntropyLoss()
    variants = {"one start": {}, "verified": {"verify": True}}
    totals = {name: {"blocks": 0, "products": 0, "misses": 0, "flagged": 0} for name in variants}
    misses = []
    for seed in range(args.seeds):
        for label, model in models(seed, data):
            print(f"seed {seed}: {label} ...", file=sys.stderr)
            reference = hessian_block_eigenvalues(model, [(x, y)], loss_fn, method="lanczos", max_iterations=100,
                                                  tol=args.reference_tol, seed=10_000 + seed, progress=False)
            for name, options in variants.items():
                result = hessian_block_eigenvalues(model, [(x, y)], loss_fn, method="lanczos", max_iterations=100,
                                                   tol=args.tol, seed=seed, progress=False, **options)
                errors = ((result.eigenvalues - reference.eigenvalues).abs()
                          / reference.eigenvalues.abs().clamp_min(1e-30))
                total = totals[name]
                total["blocks"] += len(result.block_names)
                total["products"] += result.products
                total["misses"] += int((errors > args.accuracy).sum())
                if result.verify:
                    total["flagged"] += len(result.disagreeing)
                for block in (errors > args.accuracy).nonzero().flatten().tolist():
                    misses.append({"seed": seed, "model": label, "variant": name,
                                   "block": result.block_names[block],
                                   "value": float(result.eigenvalues[block]),
                                   "reference": float(reference.eigenvalues[block])})
    print(json.dumps({"totals": totals, "misses": misses}, indent=2))


if __name__ == "__main__":
    main()
