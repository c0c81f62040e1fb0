"""Training curves."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from vizpipe.render.common import save
from vizpipe.store import Results

log = logging.getLogger(__name__)


def render_training(results: Results, out: Path, formats) -> list[Path]:
    group = results["training"]
    epochs = np.arange(1, len(group["train_loss"]) + 1)
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(8, 3), constrained_layout=True)
    loss_axis.plot(epochs, group["train_loss"], marker="o")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss")
    accuracy_axis.plot(epochs, group["train_accuracy"], marker="o", label="train")
    accuracy_axis.plot(epochs, group["test_accuracy"], marker="o", label="test")
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("accuracy")
    accuracy_axis.legend()
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    return save(figure, out, "training", formats)
