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

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coun_tune.core.dataset_arrays import AugmentPolicy, DatasetArrays
from coun_tune.errors import UsageError

__all__ = [
    "AugmentPolicy",
    "DatasetArrays",
    "DATASETS",
    "IMAGE_SIZES",
    "DEFAULT_ROOTS",
    "check_dataset_name",
    "load_dataset",
]


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
        train_x=x[idx_train],
        train_y=y[idx_train],
        test_x=x[idx_test],
        test_y=y[idx_test],
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
