"""Hessian-vector products of a model's loss, as a block-diagonal linear operator.

A block is a list of parameter tensors. For block ``b`` the operator applies
``H_bb``, the Hessian of the mean loss with respect to that block's parameters
alone, all others held fixed; one block holding every parameter is the whole
Hessian. Vectors are flat: the block's parameters flattened and concatenated.

With ``curvature="ggn"`` the operator is the generalized Gauss-Newton matrix
``G = J^T H_z J`` instead (``J`` the Jacobian of the model outputs ``z`` with
respect to the block, ``H_z`` the Hessian of the loss with respect to ``z``),
positive semi-definite for a loss convex in the outputs such as cross-entropy
or mean squared error. ``J v`` comes from the double-backward trick: the
gradient of ``J^T u`` with respect to a dummy ``u``.

The products use double backward: ``H_bb v = d/dp_b (g_b . v)`` with ``g_b`` the
gradient built with ``create_graph=True``. With one batch the gradient graph is
built once and reused for every product; with several, each batch's graph is
built, used and freed in turn, so memory does not grow with the number of
batches. Under torchrun each rank passes its own batches; products and sample
counts are summed over ranks, so every rank gets the full-data product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vizpipe import distributed
from vizpipe.analyses.evaluation import Batch, LossFn
from vizpipe.errors import VizpipeError

CURVATURES = ("hessian", "ggn")


class HessianOperator:
    """Block-diagonal Hessian of the mean loss over ``batches``.

    Args:
        model: used as is (set eval mode before, if wanted); no ``.grad`` is written.
        batches: (inputs, targets) pairs; each batch mean is weighted by its sample count.
        loss_fn: mean-reduced loss.
        parameters: the tensors the blocks index into; all must require grad.
        blocks: lists of indices into ``parameters``; default one block per tensor.
        curvature: ``"hessian"`` or ``"ggn"`` (generalized Gauss-Newton).

    ``products`` counts Hessian-vector products (one per block and call).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Batch],
        loss_fn: LossFn,
        parameters: Sequence[torch.Tensor],
        blocks: Sequence[Sequence[int]] | None = None,
        curvature: str = "hessian",
    ):
        if curvature not in CURVATURES:
            raise VizpipeError(f"invalid curvature {curvature!r}; use one of {', '.join(CURVATURES)}")
        self.curvature = curvature
        self.model = model
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.parameters = list(parameters)
        self.blocks = [list(block) for block in blocks] if blocks is not None else [[i] for i in range(len(self.parameters))]
        self.sizes = [sum(self.parameters[i].numel() for i in block) for block in self.blocks]
        local = torch.tensor([float(sum(inputs.shape[0] for inputs, _ in self.batches))], dtype=torch.float64)
        self.num_samples = int(distributed.all_reduce_sum(local).item())
        if self.num_samples == 0:
            raise VizpipeError("the Hessian needs at least one evaluation sample")
        self.products = 0
        self._cached_gradients: tuple | None = None
        self._cached_outputs: tuple | None = None
        first = self.parameters[0]
        self.dtype, self.device = first.dtype, first.device

    def release(self) -> None:
        """Free the cached gradient and output graphs."""
        self._cached_gradients = None
        self._cached_outputs = None

    def _gradients(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        if self._cached_gradients is not None:
            return self._cached_gradients
        loss = self.loss_fn(self.model(inputs), targets)
        gradients = torch.autograd.grad(loss, self.parameters, create_graph=True, allow_unused=True)
        if len(self.batches) == 1:
            self._cached_gradients = gradients
        return gradients

    def _outputs(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the model outputs and the loss gradient with respect to them, with graphs."""
        if self._cached_outputs is not None:
            return self._cached_outputs
        outputs = self.model(inputs)
        (output_gradient,) = torch.autograd.grad(self.loss_fn(outputs, targets), outputs, create_graph=True)
        if len(self.batches) == 1:
            self._cached_outputs = (outputs, output_gradient)
        return outputs, output_gradient

    def _ggn_product(self, inputs, targets, block: int, vector: torch.Tensor) -> list[torch.Tensor | None]:
        outputs, output_gradient = self._outputs(inputs, targets)
        parameters = [self.parameters[i] for i in self.blocks[block]]
        dummy = torch.zeros_like(outputs, requires_grad=True)
        transposed = torch.autograd.grad(outputs, parameters, dummy, create_graph=True, allow_unused=True)
        used = [(t, v) for t, v in zip(transposed, self.split(block, vector)) if t is not None]
        if not used:
            return [None] * len(parameters)
        (jacobian_vector,) = torch.autograd.grad([t for t, _ in used], dummy, [v for _, v in used])
        (curved,) = torch.autograd.grad(output_gradient, outputs, jacobian_vector, retain_graph=True)
        return list(torch.autograd.grad(outputs, parameters, curved, retain_graph=True, allow_unused=True))

    def split(self, block: int, vector: torch.Tensor) -> list[torch.Tensor]:
        """View a flat block vector as one tensor per parameter of the block."""
        pieces = vector.split([self.parameters[i].numel() for i in self.blocks[block]])
        return [piece.view_as(self.parameters[i]) for piece, i in zip(pieces, self.blocks[block])]

    def matvec(self, vectors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Return ``{b: H_bb v_b}`` for the flat vectors ``{b: v_b}``, one pass over the data."""
        return dict(zip(vectors, self.matvec_pairs(list(vectors.items()))))

    def matvec_pairs(self, requests: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Return ``H_bb v`` for each ``(b, v)`` request in one pass over the data. A block may repeat."""
        products = [torch.zeros(self.sizes[b], dtype=self.dtype, device=self.device) for b, _ in requests]
        for inputs, targets in self.batches:
            weight = inputs.shape[0] / self.num_samples
            if self.curvature == "ggn":
                for product, (b, vector) in zip(products, requests):
                    product += weight * self._flatten(b, self._ggn_product(inputs, targets, b, vector))
                continue
            gradients = self._gradients(inputs, targets)
            for product, (b, vector) in zip(products, requests):
                indices = [i for i in self.blocks[b] if gradients[i] is not None and gradients[i].requires_grad]
                if not indices:
                    continue  # the gradient does not depend on this block: H_bb = 0
                pieces = dict(zip(self.blocks[b], self.split(b, vector)))
                outputs = torch.autograd.grad(
                    [gradients[i] for i in indices],
                    [self.parameters[i] for i in self.blocks[b]],
                    [pieces[i] for i in indices],
                    retain_graph=True,
                    allow_unused=True,
                )
                product += weight * self._flatten(b, outputs)
            # Free this batch's graph before the next forward pass builds its own.
            # Otherwise two graphs coexist at the peak.
            del gradients
        self.products += len(requests)
        if distributed.is_initialized():
            for product in products:
                distributed.all_reduce_sum(product)
        return products

    def _flatten(self, block: int, pieces) -> torch.Tensor:
        """Concatenate per-parameter products, with zeros where autograd returned None (unused)."""
        flat = [
            torch.zeros(self.parameters[i].numel(), dtype=self.dtype, device=self.device) if piece is None
            else piece.detach().flatten()
            for i, piece in zip(self.blocks[block], pieces)
        ]
        return torch.cat(flat)

    def dense_block(self, block: int) -> torch.Tensor:
        """Return ``H_bb`` as a dense matrix, one product per column (for tiny blocks and tests)."""
        size = self.sizes[block]
        columns = [self.matvec({block: torch.eye(size, dtype=self.dtype, device=self.device)[j]})[block] for j in range(size)]
        return torch.stack(columns, dim=1)
