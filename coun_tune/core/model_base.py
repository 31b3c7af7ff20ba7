"""The one interface every classifier here has: `features()` (the penultimate representation
the contrastive term is computed on) and `classifier()` (the last linear layer). Its own
module so that every file of architectures (models.py, models_extra.py) imports it without
importing the registry in models.py."""

from __future__ import annotations

import torch
from torch import nn


class FeatureClassifier(nn.Module):
    """Base: forward(x) = classifier(features(x))."""

    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, D)
        raise NotImplementedError

    def classifier(self, z: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, K) logits
        return self.fc(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
