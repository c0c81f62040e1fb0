"""Step-by-step eigensolvers for symmetric operators known only through products.

Each solver holds its current ``vector``; the caller computes ``H @ vector``
(one Hessian-vector product) and passes it to ``step``. This inversion lets
many solvers (one per Hessian block) share each pass over the data and stop
independently. Vectors are flat 1-D tensors.
"""

from __future__ import annotations

import math

import torch

WHICH = ("magnitude", "extremes")

_TINY = 1e-30


def _relative_change(new: float, old: float) -> float:
    if math.isnan(old):
        return math.inf
    if new == old:
        return 0.0
    return abs(new - old) / max(abs(new), _TINY)


class PowerIteration:
    """Power iteration; the estimate is the Rayleigh quotient ``v.Hv`` with ``|v| = 1``.

    With ``which="extremes"`` a second phase runs power iteration on the shifted
    operator ``H - lambda_1 I`` (``lambda_1`` the dominant eigenvalue), which
    converges to the eigenvalue at the other end of the spectrum. That gives the
    largest and the smallest algebraic eigenvalue; ``second_start`` seeds it.
    The estimate stops changing by less than ``tol`` relative to end a phase.
    """

    def __init__(self, start: torch.Tensor, tol: float, which: str = "magnitude", second_start: torch.Tensor | None = None):
        self.vector = start / start.norm()
        self.tol = tol
        self.which = which
        self.second_start = second_start
        self.shift = 0.0
        self.phase = 1
        self.eigenvalue = math.nan  # dominant (largest magnitude), sign kept
        self.residual = math.nan
        self.other = math.nan  # the other end of the spectrum, found in phase 2
        self.other_residual = math.nan
        self.steps_in_phase = 0
        self.done = False
        self.failed = False  # a product was NaN or infinite, so the estimates are NaN

    @property
    def converged(self) -> bool:
        return self.done and not self.failed

    @property
    def estimate(self) -> float:
        return self.eigenvalue if self.phase == 1 else self.other

    @property
    def largest(self) -> float:
        return max(self.eigenvalue, self.other) if not math.isnan(self.other) else math.nan

    @property
    def smallest(self) -> float:
        return min(self.eigenvalue, self.other) if not math.isnan(self.other) else math.nan

    def step(self, product: torch.Tensor) -> None:
        self.steps_in_phase += 1
        if not bool(torch.isfinite(product).all()):
            self.eigenvalue = self.residual = self.other = self.other_residual = math.nan
            self.failed = self.done = True
            return
        shifted = product - self.shift * self.vector if self.shift else product
        rayleigh = float(torch.dot(self.vector, shifted))
        norm = float(shifted.norm())
        value = rayleigh + self.shift
        residual = float((product - value * self.vector).norm()) / max(abs(value), _TINY) if value else 0.0
        previous = self.estimate

        if self.phase == 1:
            self.eigenvalue, self.residual = value, residual
        else:
            self.other, self.other_residual = value, residual
        phase_done = norm == 0.0 or _relative_change(value, previous) < self.tol
        if norm > 0.0:
            self.vector = shifted / norm
        if not phase_done:
            return
        if norm == 0.0 and self.phase == 1:
            self.eigenvalue, self.residual = 0.0, 0.0  # zero block: H v = 0 for every v
        if self.phase == 1 and self.which == "extremes" and self.eigenvalue != 0.0:
            self.phase = 2
            self.steps_in_phase = 0
            self.shift = self.eigenvalue
            start = self.second_start if self.second_start is not None else torch.ones_like(self.vector)
            self.vector = start / start.norm()
            return
        if self.phase == 1 and self.which == "extremes":
            self.other, self.other_residual = 0.0, 0.0
        self.done = True


class Lanczos:
    """Lanczos with full reorthogonalization (Gram-Schmidt applied twice).

    After ``k`` products the Ritz values (eigenvalues of the ``k x k``
    tridiagonal matrix) approximate the extreme eigenvalues. The residual norm
    of a Ritz pair ``(theta, y)`` is ``r = |beta_k s_k|`` with ``s_k`` the last
    component of its eigenvector in the tridiagonal basis (exact in exact
    arithmetic, so no extra product is needed). ``num_values`` extreme values
    are tracked: the largest-magnitude one, both algebraic ends, or the top
    ``num_values`` algebraic ones (``which="top"``).

    The solver is done when a product is NaN or infinite (then ``failed`` is
    set and the tracked values are NaN), when the Krylov space is exhausted
    (then the Ritz values are exact), or when every tracked value both changed
    by less than ``tol * scale`` in the last step and has an error estimate
    ``min(r, r^2 / gap)`` below ``tol * scale``. ``scale`` is the largest Ritz
    value magnitude, an estimate of ``||H||``: for the dominant value that is
    ``|theta|`` itself, and a value near zero at the other end of the spectrum
    is measured against ``||H||``, since relative to itself it could hardly
    ever pass. Some eigenvalue lies within ``r`` of ``theta``, and within
    ``r^2 / gap`` when ``gap`` is the distance from ``theta`` to the rest of the
    spectrum (Bai et al., "Templates for the Solution of Algebraic Eigenvalue
    Problems", 2000, error bounds for the Hermitian problem). Here ``gap`` is
    the distance to the nearest other Ritz value, so the second bound is an
    estimate. The change test alone can stop on a plateau: when the top
    eigenvalues are close, a Ritz value can stall for a step while still
    several percent low.
    """

    def __init__(self, start: torch.Tensor, tol: float, which: str = "magnitude", num_values: int = 1, keep_basis: bool = True):
        self.basis = [start / start.norm()]
        self.vector = self.basis[0]
        self.tol = tol
        self.which = which
        self.num_values = num_values
        self.alphas: list[float] = []
        self.betas: list[float] = []
        self.ritz_values = torch.empty(0, dtype=torch.float64)
        self.ritz_vectors = torch.empty(0, 0, dtype=torch.float64)
        self.tracked = torch.full((self._tracked_count(),), math.nan, dtype=torch.float64)
        self.tracked_residuals = torch.full_like(self.tracked, math.nan)
        self.tracked_errors = torch.full_like(self.tracked, math.nan)  # estimated |theta - lambda| / scale
        self.last_beta = math.nan
        self.exhausted = False
        self.done = False
        self.failed = False  # a product was NaN or infinite, so the tracked values are NaN

    def _tracked_count(self) -> int:
        return {"magnitude": 1, "extremes": 2}.get(self.which, self.num_values)

    @property
    def eigenvalue(self) -> float:
        return float(self.tracked[0])

    @property
    def residual(self) -> float:
        return float(self.tracked_residuals[0])

    @property
    def estimate(self) -> float:
        return self.eigenvalue

    @property
    def converged(self) -> bool:
        return self.done and not self.failed

    @property
    def steps_in_phase(self) -> int:
        return len(self.alphas) + (1 if self.failed else 0)  # a failed step appends no alpha

    def tridiagonal(self) -> torch.Tensor:
        matrix = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if len(self.alphas) > 1:
            off = torch.tensor(self.betas[: len(self.alphas) - 1], dtype=torch.float64)
            matrix += torch.diag(off, 1) + torch.diag(off, -1)
        return matrix

    def _select(self, values: torch.Tensor) -> torch.Tensor:
        if self.which == "magnitude":
            return values.abs().argmax().reshape(1)
        if self.which == "extremes":
            return torch.stack([values.argmin(), values.argmax()])
        return torch.argsort(values, descending=True)[: self.num_values]

    def step(self, product: torch.Tensor) -> None:
        if not bool(torch.isfinite(product).all()):
            # eigh fails on a tridiagonal matrix with NaN entries, and no later step could recover.
            self.tracked = torch.full_like(self.tracked, math.nan)
            self.tracked_residuals = torch.full_like(self.tracked, math.nan)
            self.tracked_errors = torch.full_like(self.tracked, math.nan)
            self.failed = self.done = True
            return
        w = product.clone()
        q = self.basis[-1]
        self.alphas.append(float(torch.dot(q, w)))
        for _ in range(2):
            for previous in self.basis:
                w -= torch.dot(previous, w) * previous
        beta = float(w.norm())
        self.last_beta = beta

        values, vectors = torch.linalg.eigh(self.tridiagonal())
        self.ritz_values, self.ritz_vectors = values, vectors
        chosen = self._select(values)
        tracked = values[chosen]
        scale = tracked.abs().clamp_min(_TINY)
        absolute = (beta * vectors[-1, chosen]).abs()
        residuals = absolute / scale
        residuals[tracked == 0] = 0.0
        gaps = _gaps(values, chosen)
        gap_bound = torch.where(gaps.isinf(), math.inf, absolute**2 / gaps)  # no other Ritz value yet: no gap
        stop_scale = max(float(values.abs().max()), _TINY)
        errors = torch.minimum(absolute, gap_bound) / stop_scale
        missing = len(self.tracked) - len(tracked)  # fewer Ritz values than requested so far
        if missing:
            padding = torch.full((missing,), math.nan, dtype=torch.float64)
            tracked, residuals = torch.cat([tracked, padding]), torch.cat([residuals, padding])
            errors = torch.cat([errors, padding])
        changes = [
            math.inf if math.isnan(old) or math.isnan(new) else abs(new - old) / stop_scale
            for new, old in zip(tracked.tolist(), self.tracked.tolist())
        ]
        self.tracked, self.tracked_residuals, self.tracked_errors = tracked, residuals, errors

        k = len(self.alphas)
        if beta <= 1e-10 * max(float(product.norm()), _TINY) or k >= q.numel():
            self.exhausted = True
            self.done = True
            return
        self.betas.append(beta)
        self.basis.append(w / beta)
        self.vector = self.basis[-1]
        if max(changes) < self.tol and bool((errors < self.tol).all()):
            self.done = True

    def ritz_vector(self, index: int) -> torch.Tensor:
        """Return the Ritz vector of ``ritz_values[index]`` in the original space, unit norm."""
        coefficients = self.ritz_vectors[:, index].to(self.basis[0])
        vector = torch.stack(self.basis[: len(coefficients)]).T @ coefficients
        return vector / vector.norm()


def _gaps(values: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Return each chosen Ritz value's distance to the nearest other one (inf when there is none)."""
    distances = (values[chosen, None] - values[None, :]).abs()
    distances[torch.arange(len(chosen)), chosen] = math.inf
    return distances.min(dim=1).values.clamp_min(_TINY)


def quadrature_nodes_weights(alphas: list[float], betas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the Gauss quadrature nodes and weights of a Lanczos run from a unit start vector.

    The nodes are the tridiagonal's eigenvalues and the weights the squared first
    components of its eigenvectors; they sum to 1. ``sum(w * f(nodes))``
    approximates ``v^T f(H) v`` (Golub and Meurant, "Matrices, Moments and
    Quadrature with Applications", 2010).
    """
    matrix = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        matrix += torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vectors = torch.linalg.eigh(matrix)
    return nodes, vectors[0] ** 2
