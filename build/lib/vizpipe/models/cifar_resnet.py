"""CIFAR ResNet-20 (He et al. 2016, section 4.2): 3x3 stem and three stages of
16, 32 and 64 channels with three basic blocks each.

NOTE: shortcuts that change shape use a 1x1 convolution with BatchNorm (option B
of the paper), not the zero-padding shortcut (option A) of the original CIFAR
experiments, so parameter counts differ slightly from the paper's 0.27M.
"""

from __future__ import annotations

import torch
from torch import nn

from vizpipe.models.resnet import BasicBlock, _make_stage


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, input_channel: int = 3, class_number: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channel, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_channels = 16
        self.layer1, in_channels = _make_stage(BasicBlock, in_channels, 16, blocks_per_stage, 1)
        self.layer2, in_channels = _make_stage(BasicBlock, in_channels, 32, blocks_per_stage, 2)
        self.layer3, in_channels = _make_stage(BasicBlock, in_channels, 64, blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, class_number)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet20(input_channel: int = 3, class_number: int = 10) -> CifarResNet:
    return CifarResNet(3, input_channel, class_number)
