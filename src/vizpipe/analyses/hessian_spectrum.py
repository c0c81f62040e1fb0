"""Whole-model Hessian spectrum: top-k eigenvalues, trace and eigenvalue density.

All three treat the selected parameters as one block, so the operator is the
full Hessian of the mean loss, or with ``curvature="ggn"`` the generalized
Gauss-Newton matrix (see ``linear_operators``). Methods follow
PyHessian (Yao et al. 2020, arXiv 1912.07145): Lanczos for the top
eigenvalues, Hutchinson's estimator with Rademacher probes for the trace, and
stochastic Lanczos quadrature (SLQ) for the density.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vizpipe.analyses.eigensolvers import Lanczos, quadrature_nodes_weights
from vizpipe.analyses.evaluation import Batch, LossFn
from vizpipe.analyses.hessian import select_parameters
from vizpipe.analyses.linear_operators import HessianOperator
from vizpipe.errors import VizpipeError

log = logging.getLogger(__name__)

TOP_K_METHODS = ("lanczos", "power_iteration")


@dataclass
class TopEigenvalues:
    """The ``k`` largest algebraic eigenvalues of the Hessian, in descending order.

    ``residuals[i]`` is ``||H v_i - lambda_i v_i|| / |lambda_i|`` of the Ritz pair;
    ``eigenvectors`` is ``[k, n]`` (flat, in the order of ``parameter_names``)
    or None when not requested.
    """

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    iterations: int
    converged: bool
    history: torch.Tensor  # [iterations, k] tracked Ritz values after each product
    eigenvectors: torch.Tensor | None
    parameter_names: list[str]
    method: str = "lanczos"


@dataclass
class TraceEstimate:
    """Hutchinson trace estimate: ``mean`` of ``z^T H z`` over Rademacher probes ``z``."""

    trace: float
    standard_error: float
    samples: torch.Tensor  # [probes] every z^T H z
    converged: bool  # the relative standard error reached its target


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: ``runs`` sets of Gauss nodes and weights, and the smoothed density.

    ``density`` is the average over runs of Gaussians of width ``sigma`` at the
    nodes, weighted by the quadrature weights, on ``grid``. It integrates to
    about 1, and its mean estimates ``trace / n``.
    """

    nodes: torch.Tensor  # [runs, steps]
    weights: torch.Tensor  # [runs, steps], each row sums to 1
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    num_parameters: int


def _operator(model, batches, loss_fn, include, exclude, curvature) -> tuple[HessianOperator, list[str]]:
    selected, _ = select_parameters(model, include, exclude)
    parameters = [p for _, p in selected]
    operator = HessianOperator(model, list(batches), loss_fn, parameters, [list(range(len(parameters)))], curvature)
    return operator, [name for name, _ in selected]


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _start_vector(operator: HessianOperator, generator: torch.Generator, rademacher: bool) -> torch.Tensor:
    size = operator.sizes[0]
    if rademacher:
        vector = torch.randint(0, 2, (size,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    else:
        vector = torch.randn(size, generator=generator, dtype=torch.float64)
    return vector.to(operator.device, operator.dtype)


def hessian_top_eigenvalues(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    k: int = 5,
    max_iterations: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    eigenvectors: bool = False,
    curvature: str = "hessian",
    progress: bool = True,
    method: str = "lanczos",
) -> TopEigenvalues:
    """Compute the ``k`` top eigenvalues of the whole Hessian by Lanczos or by power iteration with deflation.

    ``method="lanczos"`` returns the ``k`` largest algebraic eigenvalues. It
    keeps its basis, ``iterations`` vectors of the model's size, and stops when
    each of the ``k`` Ritz values changes by less than ``tol`` times the largest
    Ritz value magnitude and has an error estimate below that too (see
    ``Lanczos``), or after ``max_iterations`` products.

    ``method="power_iteration"`` finds one eigenpair after another by power
    iteration on the Hessian projected onto the orthogonal complement of the
    eigenvectors found so far (deflation), each pair stopping when its
    Rayleigh quotient changes by less than ``tol`` relative, or after
    ``max_iterations`` products. It returns the ``k`` largest-magnitude
    eigenvalues (sign kept, in the order found), which differ from the largest
    algebraic ones when a negative eigenvalue is among them. It keeps only the
    ``k`` eigenvectors, but needs many more products than Lanczos when
    eigenvalues are close. The model runs in eval mode.
    """
    if method not in TOP_K_METHODS:
        raise VizpipeError(f"invalid Hessian top-k method {method!r}; use one of {', '.join(TOP_K_METHODS)}")
    if k < 1:
        raise VizpipeError(f"invalid Hessian top_k {k}: it must be at least 1")
    if max_iterations < k:
        raise VizpipeError(f"invalid max_iterations {max_iterations}: it must be at least top_k ({k})")
    operator, names = _operator(model, batches, loss_fn, include, exclude, curvature)
    if k > operator.sizes[0]:
        raise VizpipeError(f"invalid Hessian top_k {k}: the selected parameters have only {operator.sizes[0]} entries")
    if eigenvectors:
        log.info("Hessian: keeping %d eigenvectors of %d entries (%.1f MB)", k, operator.sizes[0],
                 k * operator.sizes[0] * operator.parameters[0].element_size() / 1e6)
    generator = torch.Generator().manual_seed(seed)
    if method == "power_iteration":
        with _EvalMode(model):
            try:
                top = _deflated_power_iteration(operator, generator, k, max_iterations, tol, progress)
            finally:
                operator.release()
        top.parameter_names = names
        if not eigenvectors:
            top.eigenvectors = None
        if not top.converged:
            log.warning("Hessian top-%d: not every eigenpair converged within %d products each (tol %g)", k, max_iterations, tol)
        return top
    solver = Lanczos(_start_vector(operator, generator, rademacher=False), tol, which="top", num_values=k)
    history = []
    with _EvalMode(model):
        try:
            for _ in tqdm(range(max_iterations), desc="hessian top-k", disable=None if progress else True):
                solver.step(operator.matvec({0: solver.vector})[0])
                history.append(solver.tracked.clone())
                if solver.done:
                    break
        finally:
            operator.release()

    vectors = None
    if eigenvectors:
        order = torch.argsort(solver.ritz_values, descending=True)[:k]
        vectors = torch.stack([solver.ritz_vector(int(i)) for i in order]).detach()
    if solver.failed:
        log.warning("Hessian top-%d: NaN or infinite Hessian-vector products; check the loss and the weights", k)
    elif not solver.done:
        log.warning("Hessian top-%d: not converged after %d products (tol %g)", k, max_iterations, tol)
    return TopEigenvalues(
        eigenvalues=solver.tracked.clone(),
        residuals=solver.tracked_residuals.clone(),
        iterations=solver.steps_in_phase,  # counts a NaN product that stopped the run too
        converged=solver.converged,
        history=torch.stack(history),
        eigenvectors=vectors,
        parameter_names=names,
    )


def _deflated_power_iteration(operator: HessianOperator, generator: torch.Generator, k: int,
                              max_iterations: int, tol: float, progress: bool) -> TopEigenvalues:
    """Find ``k`` eigenpairs one after another by power iteration, deflating the ones found."""
    found: list[torch.Tensor] = []
    values, residuals, history = [], [], []
    converged = True

    def project(vector: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # twice, for orthogonality in floating point (as in Gram-Schmidt)
            for eigenvector in found:
                vector = vector - torch.dot(eigenvector, vector) * eigenvector
        return vector

    bar = tqdm(total=k * max_iterations, desc="hessian top-k", disable=None if progress else True)
    try:
        for _ in range(k):
            vector = project(_start_vector(operator, generator, rademacher=False))
            vector = vector / vector.norm()
            estimate, residual, done = math.nan, math.nan, False
            for _ in range(max_iterations):
                product = operator.matvec({0: vector})[0]
                bar.update()
                previous = estimate
                estimate = float(torch.dot(vector, product))
                residual = float((product - estimate * vector).norm()) / max(abs(estimate), 1e-30)
                history.append(values + [estimate] + [math.nan] * (k - len(values) - 1))
                deflated = project(product)
                norm = float(deflated.norm())
                if norm == 0.0:  # the deflated operator is zero: the remaining eigenvalues are 0
                    estimate, residual, done = 0.0, 0.0, True
                    break
                change = abs(estimate - previous) / max(abs(estimate), 1e-30) if not math.isnan(previous) else math.inf
                vector = deflated / norm
                if change < tol:
                    done = True
                    break
            converged = converged and done
            values.append(estimate)
            residuals.append(residual)
            # The last iterate, orthogonal to the earlier eigenvectors, is this pair's eigenvector.
            found.append(project(vector) / project(vector).norm())
    finally:
        bar.close()
    return TopEigenvalues(
        eigenvalues=torch.tensor(values, dtype=torch.float64),
        residuals=torch.tensor(residuals, dtype=torch.float64),
        iterations=len(history),
        converged=converged,
        history=torch.tensor(history, dtype=torch.float64),
        eigenvectors=torch.stack(found).detach(),
        parameter_names=[],
        method="power_iteration",
    )


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    max_probes: int = 100,
    min_probes: int = 10,
    relative_standard_error: float = 0.01,
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    curvature: str = "hessian",
    progress: bool = True,
) -> TraceEstimate:
    """Estimate the Hessian's trace by Hutchinson's method with Rademacher probes.

    ``z^T H z`` is unbiased for the trace when ``z`` has independent +-1 entries.
    The estimate is the mean over probes and its standard error the sample
    standard deviation over ``sqrt(probes)``. Probing stops once at least
    ``min_probes`` probes give a standard error below
    ``relative_standard_error * |mean|``, or after ``max_probes``.
    """
    if min_probes < 2 or max_probes < min_probes:
        raise VizpipeError(
            f"invalid trace probes: min_probes {min_probes} must be at least 2 and at most max_probes {max_probes}"
        )
    if not relative_standard_error > 0:
        raise VizpipeError(f"invalid relative_standard_error {relative_standard_error}: it must be positive")
    operator, _ = _operator(model, batches, loss_fn, include, exclude, curvature)
    generator = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    converged = False
    with _EvalMode(model):
        try:
            for _ in tqdm(range(max_probes), desc="hessian trace", disable=None if progress else True):
                probe = _start_vector(operator, generator, rademacher=True)
                samples.append(float(torch.dot(probe, operator.matvec({0: probe})[0])))
                if not math.isfinite(samples[-1]):
                    break  # every later probe would be NaN too
                if len(samples) >= min_probes:
                    mean, error = _mean_and_standard_error(samples)
                    if error <= relative_standard_error * abs(mean):
                        converged = True
                        break
        finally:
            operator.release()
    mean, error = _mean_and_standard_error(samples)
    if not math.isfinite(samples[-1]):
        log.warning("Hessian trace: NaN or infinite Hessian-vector products; check the loss and the weights")
    elif not converged:
        log.warning("Hessian trace: relative standard error %.3g after %d probes is above the target %g",
                    error / max(abs(mean), 1e-30), len(samples), relative_standard_error)
    return TraceEstimate(mean, error, torch.tensor(samples, dtype=torch.float64), converged)


def _mean_and_standard_error(samples: list[float]) -> tuple[float, float]:
    values = torch.tensor(samples, dtype=torch.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan  # one sample has no spread to estimate
    return float(values.mean()), float(values.std(correction=1)) / math.sqrt(len(values))


def hessian_density(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    runs: int = 3,
    steps: int = 80,
    sigma: float = 0.01,
    grid_points: int = 1000,
    seed: int = 0,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    curvature: str = "hessian",
    progress: bool = True,
) -> SpectralDensity:
    """Estimate the Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Each of ``runs`` Lanczos runs of ``steps`` products from a random unit
    vector gives Gauss quadrature nodes and weights. The density broadens every
    node into a Gaussian of standard deviation ``sigma * (max node - min node)``
    and is evaluated on ``grid_points`` points covering the nodes plus 5 widths.
    """
    if runs < 1 or steps < 1 or grid_points < 2:
        raise VizpipeError(f"invalid density options runs={runs}, steps={steps}, grid_points={grid_points}: "
                           "runs and steps must be at least 1, grid_points at least 2")
    if not sigma > 0:
        raise VizpipeError(f"invalid density sigma {sigma}: it must be positive")
    operator, _ = _operator(model, batches, loss_fn, include, exclude, curvature)
    steps = min(steps, operator.sizes[0])
    generator = torch.Generator().manual_seed(seed)
    all_nodes, all_weights = [], []
    with _EvalMode(model):
        try:
            for _ in tqdm(range(runs), desc="hessian density", disable=None if progress else True):
                solver = Lanczos(_start_vector(operator, generator, rademacher=False), tol=0.0)
                for _ in range(steps):
                    solver.step(operator.matvec({0: solver.vector})[0])
                    if solver.exhausted or solver.failed:
                        break
                if solver.failed:
                    log.warning("Hessian density: NaN or infinite Hessian-vector products; check the loss and the "
                                "weights. The density is NaN")
                    nan = torch.full((runs, 1), math.nan, dtype=torch.float64)
                    grid = torch.full((grid_points,), math.nan, dtype=torch.float64)
                    return SpectralDensity(nan, nan.clone(), grid, grid.clone(), math.nan, operator.sizes[0])
                nodes, weights = quadrature_nodes_weights(solver.alphas, solver.betas)
                all_nodes.append(nodes)
                all_weights.append(weights)
        finally:
            operator.release()

    # Runs that stopped early (exhausted Krylov space) are padded with zero-weight nodes.
    width = max(len(nodes) for nodes in all_nodes)
    nodes = torch.stack([torch.cat([n, n[-1:].repeat(width - len(n))]) for n in all_nodes])
    weights = torch.stack([torch.cat([w, w.new_zeros(width - len(w))]) for w in all_weights])
    span = float(nodes.max() - nodes.min())
    scale = sigma * span if span > 0 else sigma * max(float(nodes.abs().max()), 1.0)
    grid = torch.linspace(float(nodes.min()) - 5 * scale, float(nodes.max()) + 5 * scale, grid_points, dtype=torch.float64)
    gaussians = torch.exp(-0.5 * ((grid[:, None] - nodes.flatten()[None, :]) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
    density = (gaussians * weights.flatten()[None, :]).sum(dim=1) / len(all_nodes)
    return SpectralDensity(nodes, weights, grid, density, scale, operator.sizes[0])


def eigenvector_directions(model: nn.Module, top: TopEigenvalues) -> list[list[torch.Tensor]]:
    """Split each top eigenvector into one tensor per parameter of ``model``, for ``loss_landscape``.

    Parameters outside the eigenvectors (frozen or excluded) get zero tensors.
    Pass two of the returned directions as ``loss_landscape(..., directions=(d1, d2))``;
    each has unit norm, so landscape coordinates are distances in weight space.
    """
    if top.eigenvectors is None:
        raise VizpipeError("missing eigenvectors in the top-k result; rerun hessian_top_eigenvalues with eigenvectors=True")
    named = dict(model.named_parameters())
    directions = []
    for vector in top.eigenvectors:
        pieces = dict(zip(top.parameter_names, vector.split([named[n].numel() for n in top.parameter_names])))
        directions.append([
            pieces[name].view_as(p).detach().clone() if name in pieces else torch.zeros_like(p).detach()
            for name, p in named.items()
        ])
    return directions
