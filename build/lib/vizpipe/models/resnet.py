"""ImageNet-style ResNets with the module names of the reference models.

Module names (``pre_conv``, ``pre_bn``, ``layers.<stage>.<block>.conv1``, ``fc``)
match the federated-learning framework vizpipe grew from, so checkpoints and
layer lists written for those models load unchanged. ResNet-8 has 29 parameter
tensors.
"""

from __future__ import annotations

import torch
from torch import nn

STAGE_WIDTHS = (64, 128, 256, 512)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """Bottleneck block with the stride on the 3x3 convolution (ResNet v1.5)."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with a 7x7 stride-2 stem, max pooling and 1 to 4 stages.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        blocks_per_stage: number of blocks in each stage; stage ``i`` has
            ``STAGE_WIDTHS[i]`` channels (times the block's expansion).
        input_channel: channels of the input image.
        class_number: number of output logits.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: list[int],
        input_channel: int = 3,
        class_number: int = 10,
    ):
        super().__init__()
        if not 1 <= len(blocks_per_stage) <= len(STAGE_WIDTHS):
            raise ValueError(f"a ResNet has 1 to 4 stages, got {len(blocks_per_stage)}")
        self.pre_conv = nn.Conv2d(input_channel, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.pre_bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels = 64
        stages = []
        for index, num_blocks in enumerate(blocks_per_stage):
            width = STAGE_WIDTHS[index]
            stride = 1 if index == 0 else 2
            stage, in_channels = _make_stage(block, in_channels, width, num_blocks, stride)
            stages.append(stage)
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, class_number)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.pre_bn(self.pre_conv(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _make_stage(block, in_channels: int, width: int, num_blocks: int, stride: int):
    out_channels = width * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
    blocks = [block(in_channels, width, stride, downsample)]
    blocks += [block(out_channels, width) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks), out_channels


def resnet4(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [1], input_channel, class_number)


def resnet6(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [1, 1], input_channel, class_number)


def resnet8(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1], input_channel, class_number)


def resnet10(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], input_channel, class_number)


def resnet18(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], input_channel, class_number)


def resnet34(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], input_channel, class_number)


def resnet50(input_channel: int = 3, class_number: int = 10) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], input_channel, class_number)
