"""The dataset container every dataset factory returns, and shared preprocessing."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vizpipe.errors import VizpipeError


@dataclass
class ImageDataset:
    """Train and test splits as normalized float32 tensors.

    ``x_*`` have shape [N, C, H, W] and are already normalized with ``mean`` and
    ``std`` (one value per channel); ``y_*`` are int64 class indices of shape [N].
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: list[float]
    std: list[float]

    @property
    def image_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            return self.x_train, self.y_train
        if name == "test":
            return self.x_test, self.y_test
        raise VizpipeError(f"unknown dataset split {name!r}; use 'train' or 'test'")


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or any(int(v) < 1 for v in image_shape):
        raise VizpipeError(
            f"invalid dataset.image_shape {list(image_shape)}: expected [channels, height, width] "
            "with positive values, e.g. [1, 16, 16]"
        )
    channels, height, width = (int(v) for v in image_shape)
    return channels, height, width


def check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[list[float], list[float]]:
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise VizpipeError(
            f"dataset.mean {mean} and dataset.std {std} need one value per image channel ({channels}) "
            "or a single value for all channels"
        )
    if any(v <= 0 for v in std):
        raise VizpipeError(f"dataset.std {std} must be positive")
    return mean, std


def check_num_classes(dataset: str, configured: int, actual: int) -> None:
    if configured != actual:
        raise VizpipeError(f"dataset.num_classes is {configured}, but {dataset} has {actual} classes; set it to {actual}")


def resize_and_normalize(
    images: torch.Tensor, image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Resize [N, C0, H0, W0] images in [0, 1] to ``image_shape``, then normalize per channel.

    Grayscale inputs (C0 = 1) are repeated to the requested channel count; other
    channel mismatches are an error.
    """
    channels, height, width = check_image_shape(image_shape)
    mean, std = check_stats(mean, std, channels)
    images = images.float()
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise VizpipeError(
                f"cannot turn {images.shape[1]}-channel images into {channels} channels; "
                f"set dataset.image_shape to [{images.shape[1]}, {height}, {width}]"
            )
        images = images.expand(-1, channels, -1, -1)
    if tuple(images.shape[2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return ((images - mean_t) / std_t).contiguous()


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split tensors into a list of (inputs, targets) batches; the last one may be smaller."""
    if batch_size < 1:
        raise VizpipeError(f"invalid batch size {batch_size}: it must be at least 1")
    return list(zip(x.split(batch_size), y.split(batch_size)))


def iterate_shuffled(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]
