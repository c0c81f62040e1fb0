"""Directions through weight space for loss landscapes.

A direction is one tensor per moved entry of the model's state: every
parameter, plus the floating-point buffers (BatchNorm running statistics) when
``include_buffers`` is set. ``Directions`` bundles one or two of them with the
entry names, so a landscape can check that they fit the model it moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from vizpipe.errors import VizpipeError

NORMALIZATIONS = ("filter", "layer", "none")
IGNORE_OPTIONS = ("biasbn", "none")
KINDS = ("random", "target", "pca")


@dataclass
class Directions:
    """One or two directions over the entries ``names`` of a model's state.

    ``vectors[k][i]`` is direction ``k``'s tensor for entry ``names[i]``.
    ``extras`` contains kind-specific arrays, e.g. ``explained_variance_ratio`` and
    ``trajectory`` (the checkpoints' coordinates) for PCA directions.
    """

    names: list[str]
    vectors: list[list[torch.Tensor]]
    kind: str = "random"
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return len(self.vectors)

    def to(self, tensors: list[torch.Tensor]) -> Directions:
        """Return the directions with each tensor on the device and dtype of ``tensors[i]``."""
        vectors = [[d.to(t) for d, t in zip(vector, tensors)] for vector in self.vectors]
        return Directions(self.names, vectors, self.kind, self.extras)

    def cosine(self) -> float:
        """Cosine between the two directions (NaN for one direction or a zero vector)."""
        if self.dims != 2:
            return float("nan")
        a = torch.cat([d.flatten().double().cpu() for d in self.vectors[0]])
        b = torch.cat([d.flatten().double().cpu() for d in self.vectors[1]])
        denominator = float(a.norm() * b.norm())
        return float(torch.dot(a, b)) / denominator if denominator > 0 else float("nan")


def state_entries(model: nn.Module, include_buffers: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Return the (name, tensor) pairs a landscape moves: all parameters, then float buffers if asked."""
    entries = [(name, p) for name, p in model.named_parameters()]
    if include_buffers:
        entries += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    return entries


def check_random_options(normalization: str, ignore: str) -> None:
    """Raise ``VizpipeError`` for a normalization or ignore option that random directions do not know."""
    if normalization not in NORMALIZATIONS:
        raise VizpipeError(f"invalid direction normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    if ignore not in IGNORE_OPTIONS:
        raise VizpipeError(f"invalid ignore option {ignore!r}; use one of {', '.join(IGNORE_OPTIONS)}")


def _random_vector(entries, generator, normalization, ignore) -> list[torch.Tensor]:
    vector = []
    for _, tensor in entries:
        weight = tensor.detach()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32).to(weight)
        if weight.dim() <= 1:
            noise = torch.zeros_like(weight) if ignore == "biasbn" else weight.clone()
        elif normalization == "filter":
            weight_norms = weight.flatten(1).norm(dim=1)
            noise_norms = noise.flatten(1).norm(dim=1)
            noise = noise * (weight_norms / (noise_norms + 1e-10)).view(-1, *[1] * (weight.dim() - 1))
        elif normalization == "layer":
            noise = noise * (weight.norm() / (noise.norm() + 1e-10))
        vector.append(noise)
    return vector


def random_directions(
    model: nn.Module,
    dims: int = 2,
    seed: int = 0,
    normalization: str = "filter",
    ignore: str = "biasbn",
    include_buffers: bool = False,
) -> Directions:
    """Draw ``dims`` Gaussian directions (Li et al. 2018).

    ``normalization="filter"`` rescales each output filter (slice along dim 0) of
    an entry with 2 or more dims to the norm of the same filter in the model.
    ``"layer"`` rescales whole tensors, and ``"none"`` keeps the raw Gaussian. 1-D
    entries (biases, BatchNorm parameters and statistics) get a zero direction
    with ``ignore="biasbn"``, and a copy of their own values otherwise, as in
    Li et al.'s code. Draws happen on the CPU from ``seed``, so a seed gives the
    same directions on any device.
    """
    check_random_options(normalization, ignore)
    if dims not in (1, 2):
        raise VizpipeError(f"invalid landscape dims {dims}: use 1 or 2")
    entries = state_entries(model, include_buffers)
    generator = torch.Generator().manual_seed(seed)
    vectors = [_random_vector(entries, generator, normalization, ignore) for _ in range(dims)]
    return Directions([name for name, _ in entries], vectors, "random")


def _matching_state(model_entries, state: Mapping[str, torch.Tensor], label: str) -> list[torch.Tensor]:
    missing = [name for name, _ in model_entries if name not in state]
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise VizpipeError(f"{label} lacks entries of the model ({shown}); it must come from the same architecture")
    tensors = []
    for name, tensor in model_entries:
        value = state[name]
        if value.shape != tensor.shape:
            raise VizpipeError(
                f"{label}: {name} has shape {list(value.shape)}, the model has {list(tensor.shape)}; "
                "it must come from the same architecture"
            )
        tensors.append(value.detach().to(tensor))
    return tensors


def target_directions(
    model: nn.Module, targets: list[Mapping[str, torch.Tensor]], include_buffers: bool = True
) -> Directions:
    """Directions ``d_k = theta_k - theta`` from the model's weights to one or two target state_dicts.

    With one target and coordinates ``alpha`` from -0.5 to 1.5 this is the linear
    interpolation of Goodfellow et al. 2015: ``alpha = 0`` is the model and
    ``alpha = 1`` the target. BatchNorm statistics move too unless
    ``include_buffers`` is False.
    """
    if len(targets) not in (1, 2):
        raise VizpipeError(f"target directions need 1 or 2 target checkpoints, got {len(targets)}")
    entries = state_entries(model, include_buffers)
    vectors = []
    for index, state in enumerate(targets):
        target = _matching_state(entries, state, f"target checkpoint {index + 1}")
        vectors.append([t - tensor.detach() for t, (_, tensor) in zip(target, entries)])
    return Directions([name for name, _ in entries], vectors, "target")


def pca_directions(
    model: nn.Module, trajectory: list[Mapping[str, torch.Tensor]], dims: int = 2, ignore: str = "biasbn"
) -> Directions:
    """Principal directions of a training trajectory around the model's weights (Li et al. 2018, section 7).

    Each checkpoint's difference ``theta_i - theta`` is a row of a matrix
    (parameters only, with 1-D entries zeroed under ``ignore="biasbn"``). After
    centering the rows, the matrix's top right-singular vectors are the
    directions, orthonormal in the flattened parameter space. ``extras`` contains ``explained_variance_ratio``
    [dims] and ``trajectory`` [checkpoints, dims], the uncentered differences
    projected onto the directions, to draw the path over the contour.
    """
    if dims not in (1, 2):
        raise VizpipeError(f"invalid landscape dims {dims}: use 1 or 2")
    if len(trajectory) < dims + 1:
        raise VizpipeError(
            f"PCA directions need at least {dims + 1} trajectory checkpoints for {dims} direction(s), got {len(trajectory)}"
        )
    entries = state_entries(model, include_buffers=False)
    keep = [not (ignore == "biasbn" and tensor.dim() <= 1) for _, tensor in entries]
    rows = []
    for index, state in enumerate(trajectory):
        tensors = _matching_state(entries, state, f"trajectory checkpoint {index + 1}")
        parts = [
            (t - tensor.detach()).flatten().double().cpu() if k else torch.zeros(tensor.numel(), dtype=torch.float64)
            for t, (_, tensor), k in zip(tensors, entries, keep)
        ]
        rows.append(torch.cat(parts))
    matrix = torch.stack(rows)
    centered = matrix - matrix.mean(dim=0, keepdim=True)
    _, singular_values, right = torch.linalg.svd(centered, full_matrices=False)
    variance = singular_values**2
    if float(variance.sum()) == 0.0:
        raise VizpipeError("the trajectory checkpoints are all identical; PCA directions are undefined")
    ratios = variance[:dims] / variance.sum()
    components = right[:dims]  # [dims, n], orthonormal rows
    # Fix the sign so the first checkpoint has non-negative coordinates (deterministic output).
    signs = torch.where(matrix[0] @ components.T < 0, -1.0, 1.0).to(components)
    components = components * signs[:, None]
    projected = matrix @ components.T

    vectors = []
    for component in components:
        vector, offset = [], 0
        for _, tensor in entries:
            count = tensor.numel()
            vector.append(component[offset : offset + count].view(tensor.shape).to(tensor))
            offset += count
        vectors.append(vector)
    return Directions(
        [name for name, _ in entries],
        vectors,
        "pca",
        {"explained_variance_ratio": ratios.float(), "trajectory": projected.float()},
    )


def check_fits(model_entries: list[tuple[str, torch.Tensor]], directions: Directions, dims: int | None = None) -> None:
    """Raise ``VizpipeError`` unless ``directions`` has ``dims`` directions matching the entries' names and shapes."""
    if dims is not None and directions.dims != dims:
        raise VizpipeError(
            f"the directions are {directions.dims}D but the landscape is {dims}D; "
            f"set analysis.landscape.dims={directions.dims} or use other directions"
        )
    names = [name for name, _ in model_entries]
    if directions.names != names:
        extra = sorted(set(directions.names) - set(names))[:5]
        absent = sorted(set(names) - set(directions.names))[:5]
        raise VizpipeError(
            "the directions do not fit the model: "
            f"{len(directions.names)} entries for {len(names)} "
            f"(not in the model: {extra or 'none'}; not in the directions: {absent or 'none'}); "
            "draw directions for this model, and match include_buffers"
        )
    for index, vector in enumerate(directions.vectors):
        for name, d, (_, tensor) in zip(names, vector, model_entries):
            if d.shape != tensor.shape:
                raise VizpipeError(
                    f"direction {index + 1} does not fit the model: {name} has shape {list(d.shape)}, "
                    f"the model {list(tensor.shape)}; draw directions for this model"
                )
