"""A user architecture for tests/test_apply.py, imported by `coun-tune apply --arch
_apply_arch:tiny_net` (tests/ is on sys.path under pytest; the CLI also imports from its working
directory). It is deliberately not a coun-tune class: a plain nn.Module with its own
features() / classifier() split, sized for 8x8 images (a flattening Linear: other sizes fail)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, side: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.hidden = nn.Linear(6 * side * side, 32)
        self.head = nn.Linear(32, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, 8, 8) -> (N, 32)
        return torch.relu(self.hidden(torch.relu(self.conv(x)).flatten(1)))

    def classifier(self, z: torch.Tensor) -> torch.Tensor:  # (N, 32) -> (N, K)
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def tiny_net(num_classes: int = 10, in_channels: int = 1) -> TinyNet:
    return TinyNet(num_classes, in_channels)
