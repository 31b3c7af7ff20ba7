"""The dataset readers against small files written in each real on-disk format.

Each fixture writes the bytes a real distribution would hold (IDX with big-endian struct
headers, plain and gzip; CIFAR "python version" pickles of dicts with bytes keys) and reads
them back through `load_dataset`, so the parsing path is the one production uses.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from coun_tune.core.datasets import AugmentPolicy, load_dataset
from coun_tune.errors import UsageError

N_TRAIN, N_TEST = 20, 10


# ---------------------------------------------------------------- Fashion-MNIST (IDX) writers


def _fashion_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "train_x": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_y": ((np.arange(N_TEST) * 3) % 10).astype(np.uint8),
    }


def _idx_bytes(a: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x00000800 | a.ndim) if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


_IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _write_fashion(directory: Path, arrays: dict, gz: bool) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, base in _IDX_NAMES.items():
        data = _idx_bytes(arrays[key])
        path = directory / (base + ".gz" if gz else base)
        if gz:
            with gzip.open(path, "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)
        paths[key] = path
    return paths


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_fashion_mnist_round_trip(tmp_path, gz, layout):
    arrays = _fashion_arrays()
    directory = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    _write_fashion(directory, arrays, gz)

    ds = load_dataset("fashion_mnist", tmp_path)

    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.train_x.shape == (N_TRAIN, 1, 28, 28) and ds.test_x.shape == (N_TEST, 1, 28, 28)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[:, 0], arrays["train_x"])
    np.testing.assert_array_equal(ds.test_x[:, 0], arrays["test_x"])
    np.testing.assert_array_equal(ds.train_y, arrays["train_y"].astype(np.int64))
    np.testing.assert_array_equal(ds.test_y, arrays["test_y"].astype(np.int64))
    assert ds.augment == AugmentPolicy(crop_padding=2, flip=True, mean=(0.286,), std=(0.353,))


def test_fashion_mnist_prefers_one_complete_layout(tmp_path):
    # An incomplete flat copy must not be mixed with the complete torchvision copy.
    good = _fashion_arrays(seed=1)
    _write_fashion(tmp_path / "FashionMNIST" / "raw", good, gz=False)
    (tmp_path / _IDX_NAMES["train_x"]).write_bytes(_idx_bytes(_fashion_arrays(seed=2)["train_x"]))
    ds = load_dataset("fashion_mnist", tmp_path)
    np.testing.assert_array_equal(ds.train_x[:, 0], good["train_x"])


def _expect_usage_error(root, match: str, name: str = "fashion_mnist"):
    with pytest.raises(UsageError, match=match) as info:
        load_dataset(name, root)
    assert "\n" not in str(info.value)  # the CLI prints it on one line
    return info.value


def test_fashion_mnist_missing_dir_and_files(tmp_path):
    _expect_usage_error(tmp_path / "nope", "does not exist")
    _expect_usage_error(tmp_path, "no complete set of IDX files")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_fashion_mnist_truncated(tmp_path, gz):
    paths = _write_fashion(tmp_path, _fashion_arrays(), gz)
    target = paths["test_x"]
    if gz:
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])  # a cut-off gzip stream
        err = _expect_usage_error(tmp_path, "cannot read")
    else:
        target.write_bytes(target.read_bytes()[:-5])
        err = _expect_usage_error(tmp_path, "declares")
    assert target.name in str(err)


def test_fashion_mnist_trailing_bytes(tmp_path):
    # more data than the header declares: the file is not what its header says
    paths = _write_fashion(tmp_path, _fashion_arrays(), gz=False)
    paths["train_x"].write_bytes(paths["train_x"].read_bytes() + b"\x00" * 784)
    _expect_usage_error(tmp_path, f"holds {(N_TRAIN + 1) * 784} data bytes but its header")


def test_fashion_mnist_header_shorter_than_declared(tmp_path):
    paths = _write_fashion(tmp_path, _fashion_arrays(), gz=False)
    paths["train_y"].write_bytes(b"\x00\x00\x08")
    _expect_usage_error(tmp_path, "too short")


def test_fashion_mnist_wrong_magic(tmp_path):
    arrays = _fashion_arrays()
    paths = _write_fashion(tmp_path, arrays, gz=False)
    # an image file's magic on a label file: a swapped file, not a label file
    paths["train_y"].write_bytes(_idx_bytes(arrays["train_y"], magic=0x00000803))
    err = _expect_usage_error(tmp_path, "magic 0x00000803, expected 0x00000801")
    assert "train-labels-idx1-ubyte" in str(err)


def test_fashion_mnist_label_out_of_range(tmp_path):
    arrays = _fashion_arrays()
    arrays["test_y"][3] = 10
    _write_fashion(tmp_path, arrays, gz=True)
    _expect_usage_error(tmp_path, r"label 10, outside \[0, 10\)")


def test_fashion_mnist_count_mismatch(tmp_path):
    arrays = _fashion_arrays()
    arrays["train_y"] = arrays["train_y"][:-1]
    _write_fashion(tmp_path, arrays, gz=False)
    _expect_usage_error(tmp_path, f"has {N_TRAIN} images but .* {N_TRAIN - 1} labels")


# ---------------------------------------------------------------- CIFAR (pickle) writers


def _cifar_batch(n: int, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    d = {
        b"batch_label": b"batch %d" % seed,
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img_%d_%d.png" % (seed, i) for i in range(n)],
    }
    if num_classes == 10:
        d[b"labels"] = labels
    else:
        d[b"fine_labels"] = labels
        d[b"coarse_labels"] = [v // 5 for v in labels]
    return d


def _dump(path: Path, obj, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_cifar10(root: Path, protocol: int = 2) -> tuple[list[dict], dict]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = [_cifar_batch(N_TRAIN // 5, 10, seed=i) for i in range(1, 6)]
    for i, b in enumerate(batches, 1):
        _dump(d / f"data_batch_{i}", b, protocol)
    test = _cifar_batch(N_TEST, 10, seed=99)
    _dump(d / "test_batch", test, protocol)
    _dump(
        d / "batches.meta",
        {b"num_cases_per_batch": 4, b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072},
        protocol,
    )
    return batches, test


def _write_cifar100(root: Path) -> tuple[dict, dict]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    train, test = _cifar_batch(N_TRAIN, 100, seed=7), _cifar_batch(N_TEST, 100, seed=8)
    _dump(d / "train", train)
    _dump(d / "test", test)
    _dump(
        d / "meta",
        {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": [b"k%d" % i for i in range(20)]},
    )
    return train, test


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_round_trip(tmp_path, protocol):
    batches, test = _write_cifar10(tmp_path, protocol)
    ds = load_dataset("cifar10", tmp_path)

    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.shape == (N_TRAIN, 3, 32, 32) and ds.test_x.shape == (N_TEST, 3, 32, 32)
    assert ds.train_x.dtype == np.uint8 and ds.test_y.dtype == np.int64
    want_x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds.train_x, want_x)
    np.testing.assert_array_equal(ds.train_y, sum((b[b"labels"] for b in batches), []))
    np.testing.assert_array_equal(ds.test_x, test[b"data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(ds.test_y, test[b"labels"])
    # channel planes: the first 1024 values of a row are red, row-major
    assert ds.test_x[0, 0, 1, 0] == test[b"data"][0, 32] and ds.test_x[0, 2, 0, 0] == test[b"data"][0, 2048]
    assert ds.augment.mean == (0.4914, 0.4822, 0.4465) and ds.augment.crop_padding == 4
    assert ds.test_x.flags.writeable


def test_cifar100_round_trip(tmp_path):
    train, test = _write_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path)

    assert ds.name == "cifar100" and ds.num_classes == 100
    np.testing.assert_array_equal(ds.train_x, train[b"data"].reshape(N_TRAIN, 3, 32, 32))
    np.testing.assert_array_equal(ds.train_y, train[b"fine_labels"])
    np.testing.assert_array_equal(ds.test_y, test[b"fine_labels"])
    assert ds.test_x.shape == (N_TEST, 3, 32, 32) and ds.train_y.dtype == np.int64
    assert ds.augment.mean == (0.5071, 0.4865, 0.4409) and ds.augment.std == (0.2673, 0.2564, 0.2762)


def test_cifar10_written_by_numpy1(tmp_path):
    # Real CIFAR files name numpy 1's `numpy.core.multiarray`; emulate that in a protocol-2 stream
    # (GLOBAL opcodes are newline-terminated text, so the rename keeps the pickle valid).
    batches, _ = _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ds = load_dataset("cifar10", tmp_path)
    np.testing.assert_array_equal(ds.train_x[4:8].reshape(4, -1), batches[1][b"data"])


def test_cifar_missing(tmp_path):
    _expect_usage_error(tmp_path, "cifar-10-batches-py", name="cifar10")
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    _expect_usage_error(tmp_path, "missing data_batch_3", name="cifar10")
    _expect_usage_error(tmp_path, "cifar-100-python", name="cifar100")


def test_cifar_truncated(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:200])
    err = _expect_usage_error(tmp_path, "not a readable pickle", name="cifar10")
    assert "test_batch" in str(err)


def test_cifar_garbage_bytes(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x00not a pickle at all")
    _expect_usage_error(tmp_path, "data_batch_1.* is not a readable pickle", name="cifar10")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [os.system, _Evil()], ids=["global", "reduce"])
def test_cifar_forbidden_global_is_refused(tmp_path, payload):
    _write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "data_batch_4", {b"data": payload, b"labels": []})
    err = _expect_usage_error(tmp_path, "system, which a CIFAR file never needs", name="cifar10")
    assert "data_batch_4" in str(err)


def test_cifar_label_out_of_range(tmp_path):
    _write_cifar100(tmp_path)
    bad = _cifar_batch(N_TEST, 100, seed=8)
    bad[b"fine_labels"][0] = 100
    _dump(tmp_path / "cifar-100-python" / "test", bad)
    _expect_usage_error(tmp_path, r"labels outside \[0, 100\)", name="cifar100")


@pytest.mark.parametrize("breakage", ["short_labels", "float_data", "wrong_width", "no_labels", "not_dict"])
def test_cifar_bad_structure(tmp_path, breakage):
    _write_cifar10(tmp_path)
    b = _cifar_batch(N_TEST, 10, seed=99)
    match = {
        "short_labels": "but 9 labels",
        "float_data": "not a uint8",
        "wrong_width": "not a uint8",
        "no_labels": "no b'labels' entry",
        "not_dict": "expected a dict",
    }[breakage]
    if breakage == "short_labels":
        b[b"labels"] = b[b"labels"][:-1]
    elif breakage == "float_data":
        b[b"data"] = b[b"data"].astype(np.float32)
    elif breakage == "wrong_width":
        b[b"data"] = b[b"data"][:, :1024].copy()
    elif breakage == "no_labels":
        del b[b"labels"]
    else:
        b = [b]
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", b)
    _expect_usage_error(tmp_path, match, name="cifar10")


def test_cifar_meta_of_wrong_variant(tmp_path):
    _write_cifar10(tmp_path)
    _dump(tmp_path / "cifar-10-batches-py" / "batches.meta", {b"label_names": [b"x"] * 100})
    _expect_usage_error(tmp_path, "does not list 10", name="cifar10")


# ---------------------------------------------------------------- digits and names


def test_digits_split():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    assert ds.train_x.max() == 255 and set(np.unique(ds.test_y)) == set(range(10))


def test_unknown_dataset_name():
    with pytest.raises(UsageError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
