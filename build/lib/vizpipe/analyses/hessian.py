"""Dominant eigenvalues of the Hessian's diagonal blocks, one block per parameter tensor.

For block ``p`` the operator is ``H_pp v = d/dp (dL/dp . v)``, the Hessian of the
mean loss ``L`` with respect to ``p`` alone, all other parameters held fixed.
Multiplying by the full Hessian and normalizing each block's slice separately
(as some tools do) couples the blocks and does not give these eigenvalues.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.evaluation import Batch, LossFn
from vizpipe.errors import VizpipeError, suggest

log = logging.getLogger(__name__)

METHODS = ("power_iteration", "lanczos")


@dataclass
class HessianResult:
    """Per-block dominant eigenvalues and their convergence diagnostics.

    Arrays are indexed like ``parameter_names``. ``eigenvalues`` are the
    largest-magnitude eigenvalues (sign kept); ``residuals`` are
    ``||H v - lambda v|| / |lambda|`` for the returned eigenpair (0 for a zero
    block); ``history[b, k]`` is the estimate after product ``k + 1`` (NaN after
    the block stopped).
    """

    parameter_names: list[str]
    eigenvalues: torch.Tensor
    iterations: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    history: torch.Tensor
    skipped: list[str]
    method: str
    max_iterations: int
    tol: float
    num_samples: int

    @property
    def not_converged(self) -> list[str]:
        return [name for name, ok in zip(self.parameter_names, self.converged.tolist()) if not ok]


class _PowerIteration:
    """Power iteration on one block; the estimate is the Rayleigh quotient v.Hv with |v| = 1."""

    def __init__(self, start: torch.Tensor):
        self.vector = start / start.norm()
        self.eigenvalue = float("nan")
        self.residual = float("nan")

    def step(self, product: torch.Tensor) -> float:
        eigenvalue = float(torch.dot(self.vector.flatten(), product.flatten()))
        norm = float(product.norm())
        if norm == 0.0:
            self.eigenvalue, self.residual = 0.0, 0.0
            return 0.0
        self.residual = float((product - eigenvalue * self.vector).norm()) / max(abs(eigenvalue), 1e-30)
        self.eigenvalue = eigenvalue
        self.vector = product / norm
        return eigenvalue


class _Lanczos:
    """Lanczos with full reorthogonalization on one block.

    The estimate is the largest-magnitude Ritz value of the tridiagonal matrix;
    its residual norm is ``|beta_k * s_k|`` (the last component of the Ritz vector),
    exact in exact arithmetic.
    """

    def __init__(self, start: torch.Tensor):
        self.basis = [start.flatten() / start.norm()]
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.vector = self.basis[0].view_as(start)
        self.eigenvalue = float("nan")
        self.residual = float("nan")
        self.exhausted = False

    def step(self, product: torch.Tensor) -> float:
        w = product.flatten().clone()
        q = self.basis[-1]
        alpha = float(torch.dot(q, w))
        self.alphas.append(alpha)
        for previous in self.basis:  # full reorthogonalization, done twice for stability
            w -= torch.dot(previous, w) * previous
        for previous in self.basis:
            w -= torch.dot(previous, w) * previous
        beta = float(w.norm())

        k = len(self.alphas)
        tridiagonal = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(self.betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        index = int(values.abs().argmax())
        self.eigenvalue = float(values[index])
        scale = max(abs(self.eigenvalue), 1e-30)
        self.residual = abs(beta * float(vectors[-1, index])) / scale if self.eigenvalue != 0 else 0.0

        scale_of_w = max(float(product.norm()), 1e-30)
        if beta <= 1e-10 * scale_of_w or k >= q.numel():
            self.exhausted = True  # invariant subspace found: the Ritz values are exact
        else:
            self.betas.append(beta)
            self.basis.append(w / beta)
            self.vector = self.basis[-1].view_as(product)
        return self.eigenvalue


def block_hvps(
    model: nn.Module,
    batches: list[Batch],
    loss_fn: LossFn,
    parameters: list[torch.Tensor],
    vectors: dict[int, torch.Tensor],
    graph_cache: dict | None = None,
) -> dict[int, torch.Tensor]:
    """Compute ``H_bb v_b`` for every block ``b`` in ``vectors``, for the mean loss over ``batches``.

    Each batch's loss mean is weighted by its share of the samples. Graphs are
    built one batch at a time and freed, so memory does not grow with the number
    of batches; with a single batch, pass a dict as ``graph_cache`` to build the
    gradient graph once and reuse it across calls.
    """
    total = sum(inputs.shape[0] for inputs, _ in batches)
    products = {b: torch.zeros_like(parameters[b]) for b in vectors}
    for inputs, targets in batches:
        if graph_cache is not None and "gradients" in graph_cache:
            gradients = graph_cache["gradients"]
        else:
            loss = loss_fn(model(inputs), targets)
            gradients = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
            if graph_cache is not None:
                graph_cache["gradients"] = gradients
        weight = inputs.shape[0] / total
        for b, vector in vectors.items():
            gradient = gradients[b]
            if gradient is None or not gradient.requires_grad:
                continue  # the loss does not depend on this block: H_bb = 0
            (product,) = torch.autograd.grad(gradient, parameters[b], vector, retain_graph=True, allow_unused=True)
            if product is not None:
                products[b] += weight * product.detach()
    return products


def hessian_block_eigenvalues(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    method: str = "power_iteration",
    max_iterations: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    include: list[str] | None = None,
    progress: bool = True,
) -> HessianResult:
    """Compute the dominant eigenvalue of each parameter tensor's own Hessian block.

    Args:
        model: evaluated in eval mode (BatchNorm uses running statistics); restored
            to its previous mode afterwards. No ``.grad`` is written.
        batches: (inputs, targets) batches on the model's device; the loss is the
            mean over all their samples.
        loss_fn: mean-reduced loss.
        method: ``"power_iteration"`` or ``"lanczos"`` (more accurate for the same
            number of Hessian-vector products when eigenvalues are clustered).
        max_iterations: Hessian-vector products per block at most.
        tol: a block stops when its estimate changes by less than ``tol`` relative.
        seed: fixes the start vectors.
        include: parameter names to analyse (default: all with ``requires_grad``).
            Frozen parameters are listed in ``result.skipped``.

    Example::

        result = hessian_block_eigenvalues(model, [(x, y)], nn.CrossEntropyLoss())
        dict(zip(result.parameter_names, result.eigenvalues.tolist()))
    """
    if method not in METHODS:
        raise VizpipeError(f"invalid Hessian method {method!r}; use one of {', '.join(METHODS)}")
    if max_iterations < 1:
        raise VizpipeError(f"invalid max_iterations {max_iterations}: it must be at least 1")
    if not tol > 0:
        raise VizpipeError(f"invalid tol {tol}: it must be positive")
    batches = list(batches)
    if not batches:
        raise VizpipeError("the Hessian needs at least one evaluation batch")

    named = list(model.named_parameters())
    valid = [name for name, _ in named]
    if include is not None:
        unknown = [name for name in include if name not in valid]
        if unknown:
            raise VizpipeError(f"unknown parameter(s) {unknown} for the Hessian. {suggest(unknown[0], valid)}")
    wanted = set(valid if include is None else include)
    skipped = [name for name, p in named if name in wanted and not p.requires_grad]
    selected = [(name, p) for name, p in named if name in wanted and p.requires_grad]
    if not selected:
        raise VizpipeError("no trainable parameter selected for the Hessian; check hessian.include")
    names = [name for name, _ in selected]
    parameters = [p for _, p in selected]

    generator = torch.Generator().manual_seed(seed)
    solver_type = _PowerIteration if method == "power_iteration" else _Lanczos
    solvers = {
        b: solver_type(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p))
        for b, p in enumerate(parameters)
    }
    history = torch.full((len(parameters), max_iterations), float("nan"), dtype=torch.float64)
    iterations = torch.zeros(len(parameters), dtype=torch.int64)
    converged = torch.zeros(len(parameters), dtype=torch.bool)
    active = set(solvers)
    graph_cache = {} if len(batches) == 1 else None
    num_samples = sum(inputs.shape[0] for inputs, _ in batches)

    was_training = model.training
    model.eval()
    bar = tqdm(total=max_iterations, desc="hessian blocks", disable=None if progress else True, unit="iter")
    try:
        for k in range(max_iterations):
            products = block_hvps(
                model, batches, loss_fn, parameters, {b: solvers[b].vector for b in active}, graph_cache
            )
            for b, product in products.items():
                solver = solvers[b]
                previous = solver.eigenvalue
                estimate = solver.step(product)
                history[b, k] = estimate
                iterations[b] = k + 1
                change = abs(estimate - previous) / max(abs(estimate), 1e-30)
                if estimate == 0.0 or change < tol or getattr(solver, "exhausted", False):
                    converged[b] = True
            active = {b for b in active if not converged[b]}
            bar.update()
            bar.set_postfix(active_blocks=len(active))
            if not active:
                break
    finally:
        bar.close()
        graph_cache = None
        model.train(was_training)

    result = HessianResult(
        parameter_names=names,
        eigenvalues=torch.tensor([solvers[b].eigenvalue for b in range(len(names))], dtype=torch.float64),
        iterations=iterations,
        residuals=torch.tensor([solvers[b].residual for b in range(len(names))], dtype=torch.float64),
        converged=converged,
        history=history,
        skipped=skipped,
        method=method,
        max_iterations=max_iterations,
        tol=tol,
        num_samples=num_samples,
    )
    if result.not_converged:
        log.warning(
            "Hessian: %d block(s) did not converge within %d iterations (tol %g): %s",
            len(result.not_converged), max_iterations, tol, ", ".join(result.not_converged),
        )
    return result
