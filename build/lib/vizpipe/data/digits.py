"""The 1,797 8x8 handwritten digits bundled with scikit-learn (no download)."""

from __future__ import annotations

import numpy as np
import torch

from vizpipe.data.base import (
    ImageDataset,
    check_image_shape,
    check_num_classes,
    check_stats,
    resize_and_normalize,
)


def digits(
    image_shape: list[int] = (1, 16, 16),
    num_classes: int = 10,
    mean: list[float] = (0.3,),
    std: list[float] = (0.35,),
    test_fraction: float = 0.25,
    split_seed: int = 0,
) -> ImageDataset:
    """Load scikit-learn's digits as [N, C, H, W] tensors, resized and normalized.

    The train/test split is stratified and fixed by ``split_seed`` (default: 1,347
    train and 450 test images). Pixel values are scaled from 0..16 to [0, 1]
    before normalization.
    """
    check_num_classes("digits", num_classes, 10)
    mean, std = check_stats(mean, std, check_image_shape(image_shape)[0])
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=labels
    )
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    return ImageDataset(
        name="digits",
        x_train=resize_and_normalize(x[train_idx], image_shape, mean, std),
        y_train=y[train_idx],
        x_test=resize_and_normalize(x[test_idx], image_shape, mean, std),
        y_test=y[test_idx],
        num_classes=10,
        mean=list(mean),
        std=list(std),
    )
