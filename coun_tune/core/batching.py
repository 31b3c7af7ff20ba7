"""Device-resident batching: the dataset lives on the training device as uint8, and the
per-sample augmentation (random crop with zero padding, horizontal flip) is a handful of
batched tensor ops there. No DataLoader, no worker processes, no PIL in the hot loop.

The crop/flip distribution equals torchvision's `RandomCrop(size, padding=p)` followed by
`RandomHorizontalFlip()`: each sample draws its own offset uniformly from the (2p+1)^2
positions and its own flip with p = 0.5 (tests/test_batching.py checks this against
torchvision on a fixed seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coun_tune.core.datasets import AugmentPolicy


@dataclass
class DeviceSplit:
    """Images (N, C, H, W) uint8 and labels (N,) int64, both on the training device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Augmenter:
    """Turns a uint8 batch into normalised float32 views, one random draw per sample.

    Why per-sample: CoUn's two views are two independent draws t(I), t'(I) for every image;
    one draw per batch would make every image in a view share a crop.
    """

    def __init__(self, policy: AugmentPolicy, device: torch.device | str):
        self.policy = policy
        c = len(policy.mean)
        self.mean = torch.tensor(policy.mean, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(policy.std, device=device).view(1, c, 1, 1)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, C, H, W) float32, (x/255 - mean)/std. Test-time transform."""
        return (x_uint8.float().div_(255.0) - self.mean) / self.std

    def sample_params(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample crop offsets (top, left), each in [0, 2p], and flip flags (bool)."""
        p = self.policy.crop_padding
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
        if self.policy.flip:
            flip = torch.rand((n,), generator=generator, device=device) < 0.5
        else:
            flip = torch.zeros((n,), dtype=torch.bool, device=device)
        return top, left, flip

    @staticmethod
    def crop_flip(
        x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Crop each sample of (N, C, H, W) at its own offset from the zero-padded image, then
        mirror the flagged ones. Pure function of its inputs (tested against torchvision)."""
        n, c, h, w = x.shape
        if padding > 0:
            padded = F.pad(x, (padding, padding, padding, padding))
            rows = top.view(n, 1) + torch.arange(h, device=x.device).view(1, h)  # (N, H)
            cols = left.view(n, 1) + torch.arange(w, device=x.device).view(1, w)  # (N, W)
            # Gather rows then columns: two index_select-like gathers over broadcast indices.
            idx_r = rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
            x = padded.gather(2, idx_r)
            idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
            x = x.gather(3, idx_c)
        return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One augmented, normalised view of a uint8 batch: (N, C, H, W) float32."""
        top, left, flip = self.sample_params(x_uint8.shape[0], generator, x_uint8.device)
        return self.normalize(self.crop_flip(x_uint8, self.policy.crop_padding, top, left, flip))


def shuffled_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[torch.Tensor]:
    """Index batches over a fresh permutation of range(n); the last short batch is kept unless
    it has a single sample (a contrastive batch of one has no negatives, and batch norm
    cannot train on it)."""
    perm = torch.randperm(n, generator=generator, device=device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if idx.numel() >= 2:
            yield idx


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def ordered_batches(n: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches in order, for evaluation."""
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(start + batch_size, n), device=device)
