"""Worker for the two-rank test: run under torchrun, each rank with its share of the samples.

Usage: torchrun --nproc_per_node 2 tests/hessian_ranks.py OUTPUT.pt
Rank 0 saves the block eigenvalues (also from a verifying second start), top-k eigenvalues and trace samples to OUTPUT.pt.
"""

import sys

import torch
from torch import nn

from vizpipe import distributed
from vizpipe.analyses import hessian_block_eigenvalues
from vizpipe.analyses.hessian_spectrum import hessian_top_eigenvalues, hessian_trace


def problem():
    """The tiny float64 MLP and its 45 samples, identical on every rank and in the test."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(45, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (45,))
    return model, x, y


def shares(x, y):
    """Uneven shares (30 and 15 samples), so the sample-count weighting matters."""
    return [[(x[:30], y[:30])], [(x[30:], y[30:])]]


def run(model, batches):
    loss_fn = nn.CrossEntropyLoss()
    blocks = hessian_block_eigenvalues(model, batches, loss_fn, method="lanczos", max_iterations=40, tol=1e-10,
                                       progress=False)
    verified = hessian_block_eigenvalues(model, batches, loss_fn, max_iterations=40, tol=1e-10, verify=True,
                                         progress=False)
    top = hessian_top_eigenvalues(model, batches, loss_fn, k=3, max_iterations=40, tol=1e-10, progress=False)
    trace = hessian_trace(model, batches, loss_fn, max_probes=20, progress=False)
    return {"blocks": blocks.eigenvalues, "iterations": blocks.iterations,
            "verify": verified.eigenvalues_by_start, "top": top.eigenvalues,
            "trace": trace.samples, "num_samples": blocks.num_samples}


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.initialize(torch.device("cpu"))
    model, x, y = problem()
    output = run(model, shares(x, y)[distributed.rank()])
    if distributed.is_main():
        torch.save(output, sys.argv[1])
    distributed.shutdown()
