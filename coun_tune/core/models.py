"""Classifiers with an explicit split into `features()` (the penultimate representation the
contrastive term is computed on) and `classifier()` (the last linear layer). No hooks.

- `small_cnn`: three conv blocks and global average pooling, 64-d features; for 8x8 digits
  and 28x28 Fashion-MNIST.
- `resnet18`: ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), 512-d features.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from coun_tune.core import models_extra
from coun_tune.core.model_base import FeatureClassifier
from coun_tune.errors import UsageError

__all__ = [
    "FeatureClassifier",
    "SmallCNN",
    "ResNet18",
    "ARCHITECTURES",
    "ARCH_INPUT_SIZE",
    "build_model",
    "count_forward_macs",
]


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(FeatureClassifier):
    """conv(w) - conv(2w) - pool - conv(4w) - pool - GAP -> 4w-d features -> linear (w = 16: 64-d).

    Small enough to train on digits in seconds on a CPU, large enough to memorize its
    training set (train accuracy >= 99%), which unlearning needs (METHOD.md section 5).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv_bn(in_channels, w),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w
        self.fc = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(FeatureClassifier):
    """ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool); 512-d features
    (the pooled vector), ~11.2M parameters for 10 classes."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 512
        self.fc = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x)))


ARCHITECTURES: dict[str, Callable[[int, int], FeatureClassifier]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg16_bn": lambda c, k: models_extra.VGG16BN(c, k),
    "vit_small": lambda c, k: models_extra.ViTSmall(c, k, image_size=32),  # CIFAR (32x32)
    "vit_small_64": lambda c, k: models_extra.ViTSmall(c, k, image_size=64),  # TinyImageNet (64x64)
}


# Architectures that accept only one input size (a ViT's positional embedding is sized for it).
ARCH_INPUT_SIZE = {"vit_small": 32, "vit_small_64": 64}


def build_model(arch: str, in_channels: int, num_classes: int) -> FeatureClassifier:
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch](in_channels, num_classes)


def count_forward_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one sample of shape (C, H, W), counted over
    Conv2d and Linear layers (the paper's FLOPs = 2 x MACs; norms and activations ignored)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        macs += out.numel() * k

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs
