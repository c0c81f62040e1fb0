"""What activation maximization maximizes: a channel's mean, one neuron, or a unit,
and the diversity penalty between several images of the same channel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vizpipe.errors import VizpipeError

OBJECTIVES = ("channel", "neuron")


@dataclass(frozen=True)
class Objective:
    """The activation that image ``i`` drives for channel ``targets[i]``.

    ``kind="channel"`` is the channel's mean over all spatial positions (for a
    linear layer's 2D output, the unit's value itself). ``kind="neuron"`` is the
    channel's value at one spatial position: ``position`` (row, column) of the
    layer's output, by default its center ``(H // 2, W // 2)``. ``negative``
    makes the loop minimize instead of maximize; the activation it reports keeps
    its sign.
    """

    kind: str = "channel"
    position: tuple[int, ...] | None = None
    negative: bool = False

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise VizpipeError(f"invalid objective {self.kind!r}; use one of {', '.join(OBJECTIVES)}")

    def activation(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return [B]: the objective's activation of ``output[i]`` for channel ``targets[i]``."""
        rows = torch.arange(output.shape[0], device=output.device)
        selected = output[rows, targets]
        if selected.dim() == 1:
            return selected
        if self.kind == "channel":
            return selected.flatten(1).mean(dim=1)
        position = self.resolve_position(output.shape[2:])
        return selected[(slice(None), *position)]

    def resolve_position(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Return the neuron's index in a channel of ``spatial_shape``, checked against it."""
        spatial_shape = tuple(int(v) for v in spatial_shape)
        if self.position is None:
            return tuple(size // 2 for size in spatial_shape)
        position = tuple(int(v) for v in self.position)
        if len(position) != len(spatial_shape) or not all(0 <= p < s for p, s in zip(position, spatial_shape)):
            raise VizpipeError(
                f"neuron position {list(position)} is outside the layer's spatial shape {list(spatial_shape)}; "
                f"give {len(spatial_shape)} indices within it, or none for the center"
            )
        return position

    def score(self, activation: torch.Tensor) -> torch.Tensor:
        """Return what the loop maximizes: the activation, or its negation."""
        return -activation if self.negative else activation


def diversity(output: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return [B // group_size]: the mean pairwise cosine similarity of the Gram matrices
    of ``output`` within each group of ``group_size`` consecutive images.

    Penalizing it (the diversity term of Olah et al. 2017, "Feature
    Visualization") pushes the images of one channel apart: the Gram matrix
    of a layer's features ignores where features are, so the images differ in
    which features they use, not only in where they place them. A linear layer's
    output is treated as one position. Returns zeros for ``group_size=1``.
    """
    batch = output.shape[0]
    if group_size <= 1:
        return output.new_zeros(batch)
    features = output.reshape(batch, output.shape[1], -1)  # [B, C, positions]
    grams = features @ features.transpose(1, 2)  # [B, C, C]
    grams = torch.nn.functional.normalize(grams.flatten(1), dim=1, eps=1e-10)
    grams = grams.view(batch // group_size, group_size, -1)
    similarity = grams @ grams.transpose(1, 2)  # [groups, K, K]
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=1)
    return off_diagonal / (group_size * (group_size - 1))
