"""Small models for quick runs and tests."""

from __future__ import annotations

import math

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv-BatchNorm-ReLU-maxpool stages and a two-layer classifier head.

    Module names: ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc1``, ``fc2``. The head
    pools to 4x4, so any input of at least 4x4 pixels works.
    """

    def __init__(self, input_channel: int = 1, class_number: int = 10, width: int = 16, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channel, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head_pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden)
        self.fc2 = nn.Linear(hidden, class_number)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(self.head_pool(x), 1)
        return self.fc2(torch.relu(self.fc1(x)))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened images; layers are ``fc1`` ... ``fcN``."""

    def __init__(self, input_shape: list[int], class_number: int = 10, hidden: list[int] | None = None):
        super().__init__()
        hidden = [128] if hidden is None else list(hidden)
        sizes = [math.prod(input_shape), *hidden, class_number]
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            self.add_module(f"fc{index}", nn.Linear(fan_in, fan_out))
        self.num_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{index}")(x)
            if index < self.num_layers:
                x = torch.relu(x)
        return x
