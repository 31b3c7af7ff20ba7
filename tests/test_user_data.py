"""The user's data for `coun-tune apply` (core/user_data.py): every layout gives the same
uint8 (N, C, H, W) arrays and labels as the images that were written, in the documented order;
every malformed input is one UsageError."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coun_tune.core.user_data import DataDeclaration, load_user_data
from coun_tune.errors import UsageError

DECL = DataDeclaration(crop_padding=1, flip=False)


@pytest.fixture(scope="module")
def images():
    """24 train / 8 test RGB 6x5 (H x W) images with distinct content, labels 0..2, NCHW."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 3, 6, 5), dtype=np.uint8)
    y = np.arange(32) % 3
    return x[:24], y[:24], x[24:], y[24:]


def _png(img_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    hwc = img_chw.transpose(1, 2, 0)
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="PNG")
    return buf.getvalue()


def _assert_same(data, images):
    a = data.arrays
    for got, want in zip((a.train_x, a.train_y, a.test_x, a.test_y), images):
        np.testing.assert_array_equal(got, want)
    assert a.train_x.dtype == np.uint8 and a.num_classes == 3


def test_npz_in_both_declared_layouts(tmp_path, images):
    tx, ty, sx, sy = images
    np.savez(
        tmp_path / "nhwc.npz", train_x=tx.transpose(0, 2, 3, 1), train_y=ty, test_x=sx.transpose(0, 2, 3, 1), test_y=sy
    )
    np.savez(tmp_path / "nchw.npz", train_x=tx, train_y=ty, test_x=sx, test_y=sy)
    _assert_same(load_user_data(tmp_path / "nhwc.npz", DataDeclaration(1, False, layout="nhwc"), "cifar10"), images)
    _assert_same(load_user_data(tmp_path / "nchw.npz", DataDeclaration(1, False, layout="nchw"), "cifar10"), images)
    with pytest.raises(UsageError, match="declare their layout"):
        load_user_data(tmp_path / "nchw.npz", DECL, "cifar10")


def test_parquet_tensor_png_bytes_and_hugging_face_struct(tmp_path, images):
    tx, ty, sx, sy = images
    x, y = np.concatenate([tx, sx]), np.concatenate([ty, sy])
    split = ["train"] * len(tx) + ["test"] * len(sx)
    # test rows first in the file: order within each split is what counts
    order = np.r_[np.arange(len(tx), len(x)), np.arange(len(tx))]
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x[order].transpose(0, 2, 3, 1)))
    pq.write_table(
        pa.table({"image": tensor, "label": y[order], "split": [split[i] for i in order]}), tmp_path / "t.parquet"
    )
    _assert_same(load_user_data(tmp_path / "t.parquet", DataDeclaration(1, False, layout="nhwc"), "cifar10"), images)

    pngs = [_png(im) for im in x]
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": y, "split": split}), tmp_path / "b.parquet")
    _assert_same(load_user_data(tmp_path / "b.parquet", DECL, "cifar10"), images)
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = pa.array([{"bytes": b, "path": None} for b in pngs], hf_type)
    pq.write_table(pa.table({"image": hf, "label": y, "split": split}), tmp_path / "hf.parquet")
    _assert_same(load_user_data(tmp_path / "hf.parquet", DECL, "cifar10"), images)


def test_image_folder_order_labels_and_gray(tmp_path):
    """Classes are the sorted folder names; samples in (class, file name) order, whatever order
    they were written in; gray PNGs give one channel."""
    rng = np.random.default_rng(1)
    written = {}  # (split, class, file) -> image (H, W)
    for split in ("train", "test"):
        for cls in ("zebra", "apple", "mango"):
            (tmp_path / split / cls).mkdir(parents=True)
            for f in ("b.png", "c.jpeg" if split == "never" else "a.png"):
                img = rng.integers(0, 256, (4, 7), dtype=np.uint8)
                Image.fromarray(img, mode="L").save(tmp_path / split / cls / f)
                written[(split, cls, f)] = img
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image: skipped")
    data = load_user_data(tmp_path, DataDeclaration(0, True), "digits")
    a = data.arrays
    assert data.classes == ("apple", "mango", "zebra")
    expect = [(cls, f) for cls in ("apple", "mango", "zebra") for f in ("a.png", "b.png")]
    assert a.train_x.shape == (6, 1, 4, 7)
    for i, (cls, f) in enumerate(expect):
        np.testing.assert_array_equal(a.train_x[i, 0], written[("train", cls, f)])
        assert a.train_y[i] == ("apple", "mango", "zebra").index(cls)
    assert a.augment.mean == (0.3,) and a.augment.flip is True  # digits' normalisation: one channel


def test_mixed_gray_and_colour_become_rgb(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "c").mkdir(parents=True)
        Image.fromarray(np.full((3, 3), 7, np.uint8), mode="L").save(tmp_path / split / "c" / "g.png")
        Image.fromarray(np.full((3, 3, 3), 9, np.uint8)).save(tmp_path / split / "c" / "h.png")
    a = load_user_data(tmp_path, DataDeclaration(0, False, mean=(0.5,) * 3, std=(0.2,) * 3)).arrays
    assert a.train_x.shape == (2, 3, 3, 3)
    assert (a.train_x[0] == 7).all() and (a.train_x[1] == 9).all()


def _folder(tmp_path, sizes):
    for split in ("train", "test"):
        (tmp_path / split / "k").mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.zeros((h, w), np.uint8), mode="L").save(tmp_path / split / "k" / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("sizes", "all images must have one size"),
        ("corrupt_png", "not a readable PNG/JPEG"),
        ("no_test", "no test/ subfolder"),
        ("float_npz", "must be uint8"),
        ("corrupt_npz", "not a readable .npz"),
        ("npz_missing_key", "lacks array 'test_y'"),
        ("no_augmentation", "declare the augmentation"),
        ("mean_channels", "need 1 value"),
        ("rgb_without_norm", "declare the normalisation"),
        ("parquet_split", "must be 'train' or 'test'"),
        ("corrupt_parquet", "not a readable Parquet"),
        ("missing", "does not exist"),
        ("crop_too_big", "--crop-padding must be in"),
    ],
)
def test_bad_data_is_one_usage_error(tmp_path, case, needle):
    decl, path, ds = DECL, tmp_path / "d", "digits"
    x = np.zeros((4, 1, 8, 8), np.uint8)
    if case == "sizes":
        path = _folder(path, [(8, 8), (8, 9)])
    elif case == "corrupt_png":
        path = _folder(path, [(8, 8)])
        (path / "train" / "k" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    elif case == "no_test":
        path = _folder(path, [(8, 8)])
        import shutil

        shutil.rmtree(path / "test")
    elif case in ("float_npz", "npz_missing_key", "corrupt_npz"):
        path = tmp_path / "d.npz"
        if case == "corrupt_npz":
            path.write_bytes(b"PK\x03\x04 truncated")
        else:
            arrays = dict(
                train_x=x.astype(np.float32) if case == "float_npz" else x,
                train_y=np.zeros(4, int),
                test_x=x,
                test_y=np.zeros(4, int),
            )
            if case == "npz_missing_key":
                arrays.pop("test_y")
            np.savez(path, **arrays)
        decl = DataDeclaration(1, False, layout="nchw")
    elif case in ("no_augmentation", "mean_channels", "rgb_without_norm", "crop_too_big"):
        path = _folder(path, [(8, 8)])
        decl = {
            "no_augmentation": DataDeclaration(),
            "mean_channels": DataDeclaration(1, False, (0.5, 0.5, 0.5), (1, 1, 1)),
            "rgb_without_norm": DECL,
            "crop_too_big": DataDeclaration(8, False),
        }[case]
        ds = "cifar10" if case == "rgb_without_norm" else ds
    elif case in ("parquet_split", "corrupt_parquet"):
        path = tmp_path / "d.parquet"
        if case == "corrupt_parquet":
            path.write_bytes(b"PAR1 not really")
        else:
            pq.write_table(
                pa.table(
                    {
                        "image": pa.array([_png(np.zeros((1, 2, 2), np.uint8))], pa.binary()),
                        "label": [0],
                        "split": ["validation"],
                    }
                ),
                path,
            )
    with pytest.raises(UsageError, match=needle) as e:
        load_user_data(path, decl, ds)
    assert "\n" not in str(e.value)
