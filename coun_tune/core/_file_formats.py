"""Readers for the on-disk formats of Fashion-MNIST (IDX) and CIFAR-10/100 (Python pickles).

We read the files ourselves rather than through torchvision's dataset classes because those
md5-check whole files (so any small fixture or re-packed copy is rejected) and unpickle CIFAR
with the unrestricted `pickle.load`, which runs arbitrary code from a tampered file. torchvision
is used only to fetch the files when the caller asks for `download=True`.

Every problem with the files (missing, truncated, wrong magic, labels out of range, a pickle
that names a forbidden global) is raised as a one-line `UsageError` naming the file, so the CLI
can report it instead of showing a traceback.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from coun_tune.core.dataset_arrays import AugmentPolicy, DatasetArrays
from coun_tune.errors import UsageError

# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------

_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _find_idx(directory: Path, base: str) -> Path | None:
    # The plain file wins: torchvision keeps both the .gz and its extraction side by side.
    for candidate in (directory / base, directory / (base + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _fashion_layout(root: Path) -> dict[str, Path] | None:
    """The four files from one directory: Debian's flat layout first, then torchvision's.

    All four must come from the same directory so that a stale half-copy in one layout is never
    mixed with the other.
    """
    for directory in (root, root / "FashionMNIST" / "raw"):
        found = {key: _find_idx(directory, base) for key, base in _FASHION_FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UsageError(f"fashion_mnist: cannot read {str(path)!r}: {e}") from None


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file: a big-endian magic (0x0000, type 0x08 = ubyte, ndim), ndim big-endian
    uint32 sizes, then the values. The payload must be exactly the declared size: a short file
    is truncated and a long one is not what its header says."""
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise UsageError(f"fashion_mnist: {str(path)!r} is too short for an IDX header ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise UsageError(f"fashion_mnist: {str(path)!r} has IDX magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_len
    if payload != expected:
        raise UsageError(
            f"fashion_mnist: {str(path)!r} holds {payload} data bytes but its header {dims} declares {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _read_fashion_split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = _read_idx(images, _IDX_IMAGES_MAGIC)
    y = _read_idx(labels, _IDX_LABELS_MAGIC)
    if x.shape[1:] != (28, 28):
        raise UsageError(f"fashion_mnist: {str(images)!r} holds {x.shape[1]}x{x.shape[2]} images, expected 28x28")
    if x.shape[0] != y.shape[0]:
        raise UsageError(
            f"fashion_mnist: {str(images)!r} has {x.shape[0]} images but {str(labels)!r} has {y.shape[0]} labels"
        )
    if len(y) and y.max() >= 10:
        raise UsageError(f"fashion_mnist: {str(labels)!r} has label {int(y.max())}, outside [0, 10)")
    return x[:, None, :, :], y.astype(np.int64)


def load_fashion_mnist(root: str, download: bool) -> DatasetArrays:
    """Fashion-MNIST from `root` (Debian's flat layout) or `root/FashionMNIST/raw` (torchvision's),
    each file plain or gzip-compressed."""
    base = Path(root)
    files = _fashion_layout(base)
    if files is None and download:
        _download("fashion_mnist", "FashionMNIST", root)
        files = _fashion_layout(base)
    if files is None:
        names = ", ".join(f"{b}[.gz]" for b in _FASHION_FILES.values())
        raise UsageError(
            f"fashion_mnist: no complete set of IDX files ({names}) in {str(base)!r} "
            f"or {str(base / 'FashionMNIST' / 'raw')!r}"
        )
    train_x, train_y = _read_fashion_split(files["train_x"], files["train_y"])
    test_x, test_y = _read_fashion_split(files["test_x"], files["test_y"])
    return DatasetArrays(
        name="fashion_mnist",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        augment=AugmentPolicy(crop_padding=2, flip=True, mean=(0.286,), std=(0.353,)),
    )


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled dicts)
# --------------------------------------------------------------------------------------------

# Exactly the globals a CIFAR batch needs: numpy array and dtype reconstruction (numpy 1 writes
# `numpy.core`, numpy 2 `numpy._core`; protocol 5 uses `_frombuffer`), plus `_codecs.encode`,
# which Python 3 uses for bytes under protocols < 3. Dicts, lists, ints and bytes need none.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),
}


def _numpy_core(submodule: str):
    # Resolve against the installed numpy rather than the pickled module path, so numpy-1 files
    # load under numpy 2 without going through its deprecated `numpy.core` shim.
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy < 2
        return importlib.import_module(f"numpy.core.{submodule}")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build only numpy arrays, dtypes and plain containers."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UsageError(
                f"{str(self._path)!r} references {module}.{name}, which a CIFAR file never needs; refusing it"
            )
        where, attr = target
        if where in ("multiarray", "numeric"):
            return getattr(_numpy_core(where), attr)
        return getattr(importlib.import_module(where), attr)


def _unpickle(path: Path, dataset: str) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{dataset}: cannot read {str(path)!r}: {e}") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), path).load()
    except UsageError as e:
        raise UsageError(f"{dataset}: {e}") from None
    except Exception as e:  # truncated or corrupted: EOFError, UnpicklingError, ValueError, ...
        raise UsageError(f"{dataset}: {str(path)!r} is not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{dataset}: {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _read_cifar_batch(path: Path, dataset: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch: b"data" uint8 (n, 3072), rows holding the R, G, B planes of a 32x32 image in
    turn (hence the plain reshape to (n, 3, 32, 32)), and n integer labels."""
    d = _unpickle(path, dataset)
    data, labels = d.get(b"data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise UsageError(
            f"{dataset}: {str(path)!r} b'data' is not a uint8 (n, 3072) array (got {type(data).__name__} {shape})"
        )
    if labels is None:
        raise UsageError(f"{dataset}: {str(path)!r} has no {label_key!r} entry")
    try:
        y = np.asarray(labels)
        if y.ndim != 1 or (len(y) and not np.issubdtype(y.dtype, np.integer)):
            raise ValueError
        y = y.astype(np.int64)
    except (ValueError, TypeError):
        raise UsageError(f"{dataset}: {str(path)!r} {label_key!r} is not a list of integers") from None
    if len(y) != data.shape[0]:
        raise UsageError(f"{dataset}: {str(path)!r} has {data.shape[0]} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UsageError(f"{dataset}: {str(path)!r} has labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), y


_CIFAR = {
    # num_classes: (name, directory, train files, test file, meta file, label key, meta names key,
    #               torchvision class, normalisation mean, std)
    10: (
        "cifar10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
        "CIFAR10",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    100: (
        "cifar100",
        "cifar-100-python",
        ["train"],
        "test",
        "meta",
        b"fine_labels",
        b"fine_label_names",
        "CIFAR100",
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


def load_cifar(root: str, num_classes: int, download: bool) -> DatasetArrays:
    """CIFAR-10 (`root/cifar-10-batches-py`) or CIFAR-100 (`root/cifar-100-python`), the
    "python version" archives as torchvision or the CIFAR site unpack them."""
    if num_classes not in _CIFAR:
        raise UsageError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    name, subdir, train_files, test_file, meta_file, label_key, names_key, tv_class, mean, std = _CIFAR[num_classes]
    directory = Path(root) / subdir
    needed = [*train_files, test_file, meta_file]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing and download:
        _download(name, tv_class, root)
        missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        if directory.is_dir():
            what = f"{', '.join(missing)} in {str(directory)!r}"
        else:
            what = f"directory {str(directory)!r}"
        raise UsageError(f"{name}: missing {what} (pass download=True to fetch it)")

    # The meta file's class-name count guards against a directory of the wrong CIFAR variant.
    meta_names = _unpickle(directory / meta_file, name).get(names_key)
    if not isinstance(meta_names, list) or len(meta_names) != num_classes:
        raise UsageError(f"{name}: {str(directory / meta_file)!r} does not list {num_classes} {names_key!r}")

    train = [_read_cifar_batch(directory / f, name, label_key, num_classes) for f in train_files]
    test_x, test_y = _read_cifar_batch(directory / test_file, name, label_key, num_classes)
    return DatasetArrays(
        name=name,
        # concatenate / np.array copy: arrays built from in-band pickle buffers may be read-only
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=np.array(test_x, copy=True),
        test_y=test_y,
        num_classes=num_classes,
        augment=AugmentPolicy(crop_padding=4, flip=True, mean=mean, std=std),
    )


def _download(name: str, tv_class: str, root: str) -> None:
    """Fetch with torchvision into its usual layout under `root`; we then read the files with
    the readers above, never with torchvision's own loader."""
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, tv_class)(root, train=True, download=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a failed md5 a RuntimeError
        raise UsageError(f"{name}: download into {root!r} failed: {e}") from None
