"""Loss and accuracy over evaluation batches, weighted by sample count."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn) -> tuple[float, float, int]:
    """Return (mean loss, accuracy, sample count) of ``model`` over ``batches``.

    ``loss_fn`` must return the mean over its batch (the default of torch losses);
    each batch mean is weighted by the batch's size, so an uneven last batch counts
    per sample, not per batch. Accuracy is NaN when outputs are not [N, classes]
    logits.
    """
    total_loss = 0.0
    correct = 0
    count = 0
    classification = True
    for inputs, targets in batches:
        outputs = model(inputs)
        size = inputs.shape[0]
        total_loss += float(loss_fn(outputs, targets)) * size
        if outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point():
            correct += int((outputs.argmax(dim=1) == targets).sum())
        else:
            classification = False
        count += size
    if count == 0:
        raise ValueError("evaluation needs at least one batch with one sample")
    accuracy = correct / count if classification else float("nan")
    return total_loss / count, accuracy, count
