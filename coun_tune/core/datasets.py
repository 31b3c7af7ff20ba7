"""Datasets as uint8 arrays, each read from its real on-disk format.

A dataset is held whole in memory as `DatasetArrays`: images `(N, C, H, W)` uint8 in [0, 255],
labels `(N,)` int64, for the official train and test splits. The engine moves these to the
training device once (see `batching.py`); nothing here is a torch `Dataset`.

Each dataset declares its augmentation policy (the paper's "CHN": random crop with zero
padding, horizontal flip, normalize). Digits drop the flip: a mirrored 2, 3 or 7 is not the
same digit.

No download happens unless the caller passes `download=True` (CIFAR only, via torchvision).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def _digits(root: str | None, download: bool) -> DatasetArrays:
    """scikit-learn's 8x8 digits (1797 images, values 0..16), the embedded default.

    It has no official test split; we fix one: a stratified 80/20 split with seed 0
    (1437 train, 360 test), part of the dataset's definition and never re-drawn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    idx_train.sort()
    idx_test.sort()
    return DatasetArrays(
        name="digits",
        train_x=x[idx_train], train_y=y[idx_train], test_x=x[idx_test], test_y=y[idx_test],
        num_classes=10,
        # padding 1 at 8x8 is the same fraction of the image as the paper's 4 at 32x32
        augment=AugmentPolicy(crop_padding=1, flip=False, mean=(0.3,), std=(0.37,)),
    )


# Image side length of each dataset: lets a config be checked against an architecture with a
# fixed input size (the ViTs) before any data is read.
IMAGE_SIZES = {"digits": 8, "fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}

DEFAULT_ROOTS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
    "cifar10": "./data",
    "cifar100": "./data",
    "tinyimagenet": "./data",  # ./data/tiny-imagenet-200 (or pass the tiny-imagenet-200 folder itself)
}


def _fashion_mnist(root: str | None, download: bool) -> DatasetArrays:
    from coun_tune.core import _file_formats

    return _file_formats.load_fashion_mnist(root or DEFAULT_ROOTS["fashion_mnist"], download=download)


def _cifar10(root: str | None, download: bool) -> DatasetArrays:
    from coun_tune.core import _file_formats

    return _file_formats.load_cifar(root or DEFAULT_ROOTS["cifar10"], num_classes=10, download=download)


def _cifar100(root: str | None, download: bool) -> DatasetArrays:
    from coun_tune.core import _file_formats

    return _file_formats.load_cifar(root or DEFAULT_ROOTS["cifar100"], num_classes=100, download=download)


def _tinyimagenet(root: str | None, download: bool) -> DatasetArrays:
    from coun_tune.core._tinyimagenet import load_tinyimagenet

    return load_tinyimagenet(root or DEFAULT_ROOTS["tinyimagenet"], download=download)


DATASETS: dict[str, Callable[[str | None, bool], DatasetArrays]] = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "tinyimagenet": _tinyimagenet,
}


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}")


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False) -> DatasetArrays:
    """Load a dataset by name. Raises UsageError for an unknown name, a missing directory or a
    file that is not in the dataset's format."""
    check_dataset_name(name)
    if root is not None and not Path(root).is_dir() and not download:
        raise UsageError(f"{name}: data directory {str(root)!r} does not exist")
    return DATASETS[name](None if root is None else str(root), download)
