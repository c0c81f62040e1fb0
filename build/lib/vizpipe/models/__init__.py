"""Model zoo. Any other ``nn.Module`` comes in through a ``_target_`` in the model config."""

from vizpipe.models.cifar_resnet import cifar_resnet20
from vizpipe.models.resnet import (
    ResNet,
    resnet4,
    resnet6,
    resnet8,
    resnet10,
    resnet18,
    resnet34,
    resnet50,
)
from vizpipe.models.small import MLP, SmallCNN

__all__ = [
    "MLP",
    "ResNet",
    "SmallCNN",
    "cifar_resnet20",
    "resnet4",
    "resnet6",
    "resnet8",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
]
