"""The in-memory form of a dataset: `DatasetArrays` and its `AugmentPolicy`.

Separate from datasets.py (the registry of readers) so that the readers (_file_formats,
_tinyimagenet) import these types without importing the registry that imports them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from coun_tune.errors import UsageError


@dataclass(frozen=True)
class AugmentPolicy:
    """Per-sample training augmentation, applied identically to both contrastive views.

    crop_padding: zero padding (pixels) before a random crop back to the input size; 0 = none.
    flip: random horizontal flip with p = 0.5.
    mean, std: per-channel normalisation applied after scaling uint8 to [0, 1].
    """

    crop_padding: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class DatasetArrays:
    """A whole dataset in memory.

    train_x: (N, C, H, W) uint8; train_y: (N,) int64 in [0, num_classes);
    test_x / test_y likewise for the official test split.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    augment: AugmentPolicy

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 of the arrays' bytes: part of every cache key, so a changed file is a new
        scenario rather than a silently reused model."""
        h = hashlib.sha256(self.name.encode())
        for a in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != np.uint8 or x.ndim != 4:
                raise UsageError(f"{self.name}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
            if y.shape != (x.shape[0],):
                raise UsageError(f"{self.name}: {split} has {x.shape[0]} images but labels of shape {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise UsageError(f"{self.name}: {split} labels outside [0, {self.num_classes})")
