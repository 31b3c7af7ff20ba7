"""The TinyImageNet reader against a small folder in the real `tiny-imagenet-200` layout, with
real JPEG files written by PIL (the archive's format).

JPEG is lossy, so the images are solid colours, or two solid halves split on an 8-pixel block
boundary: each 8x8 DCT block is then constant and decodes to within a grey level or two of what
was written (quality 100, no chroma subsampling). Labels are compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coun_tune.core.datasets import DATASETS, DEFAULT_ROOTS, load_dataset
from coun_tune.core.recipes import DATASET_DEFAULTS
from coun_tune.errors import UsageError

WNIDS = ["n03", "n01", "n02"]  # wnids.txt is not sorted; labels follow sorted order
LABEL = {"n01": 0, "n02": 1, "n03": 2}
N_TRAIN_PER_CLASS = 4
VAL_WNIDS = ["n02", "n03", "n01", "n01", "n03", "n02"]
TOL = 3  # grey levels


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=100, subsampling=0)


def _colour(i: int) -> tuple[int, int, int]:
    return (10 + 37 * i) % 256, (200 - 23 * i) % 256, (60 + 51 * i) % 256


def write_tiny(base: Path) -> dict:
    """tiny-imagenet-200/ under `base`; returns the expected train/test arrays (approximate
    pixels, exact labels) in the reader's order."""
    root = base / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    train_x, train_y = [], []
    k = 0
    for wnid in sorted(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # in the real layout; not an image
        for j in range(N_TRAIN_PER_CLASS):
            c = _colour(k)
            if j == 1:  # top half c, bottom half its complement: checks the (C, H, W) orientation
                img = Image.new("RGB", (64, 64), c)
                img.paste(tuple(255 - v for v in c), (0, 32, 64, 64))
                arr = np.empty((3, 64, 64), np.uint8)
                arr[:, :32] = np.array(c, np.uint8)[:, None, None]
                arr[:, 32:] = np.array([255 - v for v in c], np.uint8)[:, None, None]
            else:
                img = Image.new("RGB", (64, 64), c)
                arr = np.broadcast_to(np.array(c, np.uint8)[:, None, None], (3, 64, 64))
            _save(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", img)
            train_x.append(arr)
            train_y.append(LABEL[wnid])
            k += 1
    test_x, test_y, lines = [], [], []
    for i, wnid in enumerate(VAL_WNIDS):
        name = f"val_{i}.JPEG"
        if i == 2:  # a grayscale JPEG, as some of the real ones are
            _save(root / "val" / "images" / name, Image.new("L", (64, 64), 77))
            test_x.append(np.full((3, 64, 64), 77, np.uint8))
        else:
            c = _colour(50 + i)
            _save(root / "val" / "images" / name, Image.new("RGB", (64, 64), c))
            test_x.append(np.broadcast_to(np.array(c, np.uint8)[:, None, None], (3, 64, 64)))
        test_y.append(LABEL[wnid])
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {
        "root": root,
        "train_x": np.stack(train_x),
        "train_y": np.array(train_y),
        "test_x": np.stack(test_x),
        "test_y": np.array(test_y),
    }


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= TOL


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_reads_the_standard_layout(tmp_path, point_at):
    want = write_tiny(tmp_path)
    data = load_dataset("tinyimagenet", tmp_path if point_at == "parent" else want["root"])
    assert data.name == "tinyimagenet"
    assert data.num_classes == 3  # len(wnids.txt); 200 for the real dataset
    assert data.image_shape == (3, 64, 64)
    assert data.train_x.dtype == np.uint8 and data.train_x.shape == (3 * N_TRAIN_PER_CLASS, 3, 64, 64)
    assert data.test_x.dtype == np.uint8 and data.test_x.shape == (len(VAL_WNIDS), 3, 64, 64)
    assert data.train_y.dtype == np.int64 and data.test_y.dtype == np.int64
    np.testing.assert_array_equal(data.train_y, want["train_y"])
    np.testing.assert_array_equal(data.test_y, want["test_y"])
    assert _close(data.train_x, want["train_x"])
    assert _close(data.test_x, want["test_x"])
    assert data.augment.crop_padding == 4 and data.augment.flip
    assert data.augment.mean == (0.4802, 0.4481, 0.3975) and data.augment.std == (0.2302, 0.2265, 0.2262)


def test_registered():
    assert "tinyimagenet" in DATASETS and DEFAULT_ROOTS["tinyimagenet"] == "./data"
    d = DATASET_DEFAULTS["tinyimagenet"]
    assert (d.arch, d.recipe, d.batch_size) == ("resnet18", "paper", 256)


def _missing_wnids(root: Path) -> None:
    (root / "wnids.txt").unlink()


def _small_image(root: Path) -> None:
    _save(root / "train" / "n02" / "images" / "n02_1.JPEG", Image.new("RGB", (32, 32), (1, 2, 3)))


def _unknown_val_wnid(root: Path) -> None:
    p = root / "val" / "val_annotations.txt"
    p.write_text(p.read_text().replace("val_3.JPEG\tn01", "val_3.JPEG\tn99"))


def _not_an_image(root: Path) -> None:
    (root / "val" / "images" / "val_4.JPEG").write_bytes(b"not a jpeg")


def _missing_class_dir(root: Path) -> None:
    for f in (root / "train" / "n03" / "images").iterdir():
        f.unlink()
    (root / "train" / "n03" / "images").rmdir()


def _missing_val_image(root: Path) -> None:
    (root / "val" / "images" / "val_5.JPEG").unlink()


def _missing_annotations(root: Path) -> None:
    (root / "val" / "val_annotations.txt").unlink()


@pytest.mark.parametrize(
    "break_it, message",
    [
        (_missing_wnids, "no wnids.txt"),
        (_small_image, "is 32x32, expected 64x64"),
        (_unknown_val_wnid, "'n99', not in wnids.txt"),
        (_not_an_image, "cannot read image"),
        (_missing_class_dir, "missing directory"),
        (_missing_val_image, "'val_5.JPEG', missing from"),
        (_missing_annotations, "val_annotations.txt"),
    ],
)
def test_bad_folders_raise_one_line_usage_errors(tmp_path, break_it, message):
    root = write_tiny(tmp_path)["root"]
    break_it(root)
    with pytest.raises(UsageError, match=message) as exc:
        load_dataset("tinyimagenet", tmp_path)
    assert "\n" not in str(exc.value)


def test_download_is_not_offered(tmp_path):
    with pytest.raises(UsageError, match="not downloaded here.*tiny-imagenet-200.zip") as exc:
        load_dataset("tinyimagenet", tmp_path / "nowhere", download=True)
    assert "\n" not in str(exc.value)
    # a present folder is read as usual even when download=True is passed
    write_tiny(tmp_path)
    assert load_dataset("tinyimagenet", tmp_path, download=True).num_classes == 3
