"""The user's own data for `coun-tune apply`, read into `DatasetArrays` (uint8 (N, C, H, W)).

Three layouts, each with a train and a test split:
  DIR/                      an image folder: DIR/train/<class>/*.png|jpg|jpeg and DIR/test/<class>/...
                            (torchvision's ImageFolder layout). Classes are the sorted folder names
                            of train/; training sample i is the i-th file in (class, file name) order.
  FILE.npz                  arrays train_x, train_y, test_x, test_y; images uint8 (N, H, W) or
                            (N, H, W, C) / (N, C, H, W) as declared by `layout` ("nhwc" | "nchw").
  FILE.parquet              columns `split` ("train" | "test"), `label` (int) and `image`: a uint8
                            fixed_shape_tensor (H, W, C) or (C, H, W) per row (layout declared), or
                            encoded PNG/JPEG bytes (binary, or Hugging Face's struct {bytes, path}).
                            Training sample i is the i-th row with split "train".

The augmentation the model was trained with (crop padding, flip) must be declared: unlearning
trains with it (METHOD.md section 5) and there is no way to infer it from the weights. The
normalisation (mean, std) may be declared; otherwise the calibration dataset's is used when its
channel count matches. Every problem is a UsageError naming the file. pyarrow and PIL are
imported lazily.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coun_tune.core.datasets import AugmentPolicy, DatasetArrays
from coun_tune.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GRAY_MODES = {"1", "L", "I", "I;16", "F"}

# Normalisation of the datasets coun-tune ships (their loaders declare the same values): the
# default for user data of the same channel count as the config's calibration dataset.
DATASET_NORMALIZATION = {
    "digits": ((0.3,), (0.37,)),
    "fashion_mnist": ((0.286,), (0.353,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


@dataclass(frozen=True)
class DataDeclaration:
    """What the user declares about the data (flags, or the config's `data:` section).

    crop_padding: pixels of zero padding before the random crop the model was trained with (0: none).
    flip: whether it was trained with random horizontal flips.
    mean, std: per-channel normalisation after scaling to [0, 1]; None: the calibration dataset's.
    layout: "nhwc" | "nchw" for 4-D arrays (NPZ, Parquet tensors); images are never guessed.
    num_classes: the model's number of outputs; None: max label + 1 (or the number of class folders).
    """

    crop_padding: int | None = None
    flip: bool | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str | None = None
    num_classes: int | None = None


@dataclass(frozen=True)
class UserData:
    arrays: DatasetArrays
    source: str  # "image_folder" | "npz" | "parquet"
    classes: tuple[str, ...] | None  # folder names, image folders only


def _decode_image(raw: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W) or (H, W, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            im = im.convert("L") if im.mode in GRAY_MODES else im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise UsageError(f"{where} is not a readable PNG/JPEG image") from None


def _stack(images: list[np.ndarray], names: list[str]) -> np.ndarray:
    """Decoded images -> (N, C, H, W) uint8. Gray and colour mixed: gray ones become RGB (as
    ImageFolder does); a size other than the first image's is an error (nothing is resized)."""
    if not images:
        return np.zeros((0, 1, 1, 1), dtype=np.uint8)
    h, w = images[0].shape[:2]
    for im, name in zip(images, names):
        if im.shape[:2] != (h, w):
            raise UsageError(
                f"image {name} is {im.shape[1]}x{im.shape[0]} pixels; {names[0]} is {w}x{h}: "
                "all images must have one size (nothing is resized)"
            )
    colour = any(im.ndim == 3 for im in images)
    out = [
        np.repeat(im[:, :, None], 3, 2) if colour and im.ndim == 2 else im if im.ndim == 3 else im[:, :, None]
        for im in images
    ]
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2))


def _read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"image folder {str(root)!r} has no {split}/ subfolder (expected {split}/<class>/*.png)")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not classes:
        raise UsageError(f"image folder {str(root / 'train')!r} has no class subfolders")
    extra = sorted({p.name for p in (root / "test").iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise UsageError(f"image folder {str(root / 'test')!r} has class {extra[0]!r}, which train/ lacks")
    out = []
    for split in ("train", "test"):
        images, labels, names = [], [], []
        for k, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                images.append(_decode_image(f.read_bytes(), f"image {str(f)!r}"))
                labels.append(k)
                names.append(str(f))
        if not images:
            raise UsageError(f"image folder {str(root / split)!r} holds no .png/.jpg/.jpeg files")
        out += [_stack(images, names), np.asarray(labels, dtype=np.int64)]
    return out[0], out[1], out[2], out[3], classes


def _to_nchw(x: np.ndarray, layout: str | None, where: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, H, W, C) or (N, C, H, W) by the declared layout."""
    if x.dtype != np.uint8:
        raise UsageError(f"{where}: images must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim == 3:
        return np.ascontiguousarray(x[:, None])
    if x.ndim != 4:
        raise UsageError(f"{where}: images must be (N, H, W) or 4-D, got shape {x.shape}")
    if layout not in ("nhwc", "nchw"):
        raise UsageError(f"{where}: 4-D images {x.shape}: declare their layout with --layout nhwc or --layout nchw")
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "nhwc" else x)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise UsageError(f"{where}: {n} images but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{where}: labels must be integers, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise UsageError(f"{where}: negative label {int(y.min())}")
    return y.astype(np.int64)


def _read_npz(path: Path, layout: str | None) -> tuple[np.ndarray, ...]:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("train_x", "train_y", "test_x", "test_y") if k not in z.files]
            if missing:
                raise UsageError(
                    f"data file {str(path)!r} lacks array {missing[0]!r} (needs train_x, train_y, test_x, test_y)"
                )
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UsageError(f"data file {str(path)!r} is not a readable .npz file ({type(e).__name__})") from None
    out = []
    for s in ("train", "test"):
        x = _to_nchw(arrays[f"{s}_x"], layout, f"{path}:{s}_x")
        out += [x, _labels(arrays[f"{s}_y"], len(x), f"{path}:{s}_y")]
    return tuple(out)


def _parquet_images(col, layout: str | None, where: str) -> np.ndarray:
    import pyarrow as pa

    col = col.combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        return _to_nchw(col.to_numpy_ndarray(), layout, where)
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:  # Hugging Face's image layout
        col = col.field("bytes")
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise UsageError(
            f"{where}: column 'image' must be a uint8 fixed_shape_tensor or PNG/JPEG bytes, got {col.type}"
        )
    raws = col.to_pylist()
    if any(r is None for r in raws):
        raise UsageError(f"{where}: column 'image' has nulls")
    names = [f"{where} row {i}" for i in range(len(raws))]
    return _stack([_decode_image(r, n) for r, n in zip(raws, names)], names)


def _read_parquet(path: Path, layout: str | None) -> tuple[np.ndarray, ...]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise UsageError(f"data file {str(path)!r} is not a readable Parquet file ({type(e).__name__})") from None
    missing = [c for c in ("image", "label", "split") if c not in table.column_names]
    if missing:
        raise UsageError(f"data file {str(path)!r} has no column {missing[0]!r} (needs image, label, split)")
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    bad = sorted({str(s) for s in split} - {"train", "test"})
    if bad:
        raise UsageError(f"data file {str(path)!r}: column 'split' must be 'train' or 'test', got {bad[0]!r}")
    if table.column("label").null_count:
        raise UsageError(f"data file {str(path)!r}: column 'label' has nulls")
    out = []
    for s in ("train", "test"):
        part = table.filter(pc.equal(table.column("split"), s))
        x = _parquet_images(part.column("image"), layout, f"{path} ({s})")
        out += [x, _labels(part.column("label").to_numpy(), len(x), f"{path} ({s})")]
    return tuple(out)


def _policy(decl: DataDeclaration, channels: int, calibration_dataset: str | None) -> AugmentPolicy:
    if decl.crop_padding is None or decl.flip is None:
        raise UsageError(
            "declare the augmentation the model was trained with: --crop-padding N and --flip or "
            "--no-flip (or data: {crop_padding: N, flip: true|false} in the config)"
        )
    mean, std = decl.mean, decl.std
    if (mean is None) != (std is None):
        raise UsageError("give both --mean and --std, or neither")
    if mean is None:
        mean, std = DATASET_NORMALIZATION.get(calibration_dataset or "", (None, None))
        if mean is None or len(mean) != channels:
            known = f"the config's dataset {calibration_dataset!r} has {len(mean)}" if mean else "no known default"
            raise UsageError(
                f"the images have {channels} channel(s) and {known}: declare the normalisation the "
                "model was trained with, --mean and --std"
            )
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"--mean/--std need {channels} value(s) (one per channel), got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise UsageError("--std values must be > 0")
    return AugmentPolicy(crop_padding=decl.crop_padding, flip=decl.flip, mean=tuple(mean), std=tuple(std))


def load_user_data(path: str | Path, decl: DataDeclaration, calibration_dataset: str | None = None) -> UserData:
    """Read the user's data (see the module docstring); UsageError on anything wrong."""
    p = Path(path)
    if p.is_dir():
        train_x, train_y, test_x, test_y, classes = _read_image_folder(p)
        source = "image_folder"
    elif not p.exists():
        raise UsageError(f"data {str(p)!r} does not exist")
    elif p.suffix.lower() == ".npz":
        (train_x, train_y, test_x, test_y), classes, source = _read_npz(p, decl.layout), None, "npz"
    elif p.suffix.lower() == ".parquet":
        (train_x, train_y, test_x, test_y), classes, source = _read_parquet(p, decl.layout), None, "parquet"
    else:
        raise UsageError(f"data {str(p)!r}: give an image folder (train/, test/), a .npz or a .parquet file")
    for s, x in (("train", train_x), ("test", test_x)):
        if len(x) == 0:
            raise UsageError(f"data {str(p)!r}: the {s} split is empty")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UsageError(
            f"data {str(p)!r}: train images are {train_x.shape[1:]} (C, H, W) but test images {test_x.shape[1:]}"
        )
    if decl.crop_padding is not None and not 0 <= decl.crop_padding < min(train_x.shape[2:]):
        raise UsageError(
            f"--crop-padding must be in [0, {min(train_x.shape[2:])}) for "
            f"{train_x.shape[2]}x{train_x.shape[3]} images, got {decl.crop_padding}"
        )
    k = len(classes) if classes else int(max(train_y.max(), test_y.max())) + 1
    if decl.num_classes is not None:
        if decl.num_classes < k:
            raise UsageError(f"--num-classes {decl.num_classes}, but the data has labels up to {k - 1}")
        k = decl.num_classes
    arrays = DatasetArrays(
        name="user",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=k,
        augment=_policy(decl, train_x.shape[1], calibration_dataset),
    )
    return UserData(arrays, source, classes)
