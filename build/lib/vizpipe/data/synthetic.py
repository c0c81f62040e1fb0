"""Seeded random images and labels of any shape, for tests and plumbing checks."""

from __future__ import annotations

import torch

from vizpipe.data.base import ImageDataset, check_image_shape, check_stats
from vizpipe.errors import VizpipeError


def synthetic(
    image_shape: list[int] = (3, 32, 32),
    num_classes: int = 10,
    num_train: int = 256,
    num_test: int = 128,
    seed: int = 0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> ImageDataset:
    """Draw standard-normal images (already "normalized") with uniform random labels."""
    channels, height, width = check_image_shape(image_shape)
    if num_classes < 1 or num_train < 1 or num_test < 1:
        raise VizpipeError(
            f"synthetic dataset needs num_classes, num_train and num_test >= 1, "
            f"got {num_classes}, {num_train}, {num_test}"
        )
    mean, std = check_stats(mean or [0.0] * channels, std or [1.0] * channels, channels)
    generator = torch.Generator().manual_seed(seed)
    shape = (channels, height, width)
    return ImageDataset(
        name="synthetic",
        x_train=torch.randn((num_train, *shape), generator=generator),
        y_train=torch.randint(num_classes, (num_train,), generator=generator),
        x_test=torch.randn((num_test, *shape), generator=generator),
        y_test=torch.randint(num_classes, (num_test,), generator=generator),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )
