"""TinyImageNet (Stanford CS231n's `tiny-imagenet-200`) read from its standard folder layout:

    tiny-imagenet-200/
        wnids.txt                          one WordNet id per line: the classes
        train/<wnid>/images/*.JPEG         the training images of class <wnid>
        val/images/*.JPEG                  the official validation images ...
        val/val_annotations.txt            ... labelled by lines "file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"

The test split is the official validation set (the test set's labels were never published).
Labels are the wnids' positions in sorted order, as torchvision's ImageFolder numbers the
class folders, and `num_classes` is the number of wnids listed in wnids.txt (200 for the real
dataset; a smaller folder in the same layout, as in the tests, has fewer). Images are read
with PIL and converted to RGB (a few hundred are grayscale) and must all be 64x64; they are
held as uint8 (N, 3, 64, 64). Train images are ordered by class, then file name; val images
in the order of val_annotations.txt.

There is no download: every problem with the files (missing, not an image, wrong size, a wnid
that wnids.txt does not list) is a one-line `UsageError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coun_tune.core.dataset_arrays import AugmentPolicy, DatasetArrays
from coun_tune.errors import UsageError

NAME = "tinyimagenet"
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SIZE = 64
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

# CHN at 64x64, as the unlearning codebases (SalUn) train TinyImageNet: RandomCrop(64, padding=4),
# horizontal flip, and TinyImageNet's per-channel mean / std.
AUGMENT = AugmentPolicy(crop_padding=4, flip=True, mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262))


def find_root(root: str | Path) -> Path | None:
    """The `tiny-imagenet-200` folder: `root/tiny-imagenet-200` or `root` itself, whichever
    holds wnids.txt (the first); None if neither does."""
    base = Path(root)
    for candidate in (base / FOLDER, base):
        if (candidate / "wnids.txt").is_file():
            return candidate
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{NAME}: cannot read {str(path)!r}: {e}") from None


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not wnids:
        raise UsageError(f"{NAME}: {str(path)!r} lists no classes")
    seen: set[str] = set()
    for w in wnids:
        if w in seen:
            raise UsageError(f"{NAME}: {str(path)!r} lists {w!r} twice")
        seen.add(w)
    return sorted(wnids)


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 (3, 64, 64)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            rgb = img.convert("RGB")
    except Exception as e:  # UnidentifiedImageError, truncated file (OSError), decompression bomb, ...
        raise UsageError(f"{NAME}: cannot read image {str(path)!r}: {type(e).__name__}: {e}") from None
    if rgb.size != (SIZE, SIZE):
        w, h = rgb.size
        raise UsageError(f"{NAME}: {str(path)!r} is {w}x{h}, expected {SIZE}x{SIZE}")
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _read_images(paths: list[Path]) -> np.ndarray:
    out = np.empty((len(paths), 3, SIZE, SIZE), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = _read_image(p)
    return out


def _train_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        directory = folder / "train" / wnid / "images"
        if not directory.is_dir():
            raise UsageError(f"{NAME}: missing directory {str(directory)!r} for class {wnid!r} of wnids.txt")
        files = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"{NAME}: no images in {str(directory)!r}")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _val_files(folder: Path, wnids: list[str]) -> tuple[list[Path], np.ndarray]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UsageError(f"{NAME}: missing {str(annotations)!r} (the labels of the test split)")
    index = {w: i for i, w in enumerate(wnids)}
    images = folder / "val" / "images"
    paths: list[Path] = []
    labels: list[int] = []
    seen: set[str] = set()
    for lineno, line in enumerate(_read_text(annotations).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise UsageError(f"{NAME}: {str(annotations)!r} line {lineno} is not 'file<TAB>wnid<TAB>...'")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise UsageError(f"{NAME}: {str(annotations)!r} line {lineno} names wnid {wnid!r}, not in wnids.txt")
        if name in seen or Path(name).name != name:
            what = "twice" if name in seen else "as a path, not a file name"
            raise UsageError(f"{NAME}: {str(annotations)!r} line {lineno} names {name!r} {what}")
        seen.add(name)
        path = images / name
        if not path.is_file():
            raise UsageError(f"{NAME}: {str(annotations)!r} line {lineno} names {name!r}, missing from {str(images)!r}")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise UsageError(f"{NAME}: {str(annotations)!r} labels no images")
    return paths, np.asarray(labels, dtype=np.int64)


def load_tinyimagenet(root: str | Path, download: bool = False) -> DatasetArrays:
    """TinyImageNet from `root/tiny-imagenet-200` or `root` itself (the unzipped archive).

    `download=True` cannot fetch it (nothing here downloads TinyImageNet): when the folder is
    missing the error says where to get it; when it is present, it is read as usual."""
    folder = find_root(root)
    if folder is None:
        base = Path(root)
        where = f"no wnids.txt in {str(base / FOLDER)!r} or {str(base)!r}"
        if download:
            raise UsageError(
                f"{NAME}: {where}, and TinyImageNet is not downloaded here: fetch {URL} and unzip it into {str(base)!r}"
            )
        raise UsageError(f"{NAME}: {where} (unzip {URL} there)")
    wnids = _read_wnids(folder / "wnids.txt")
    train_paths, train_y = _train_files(folder, wnids)
    test_paths, test_y = _val_files(folder, wnids)
    return DatasetArrays(
        name=NAME,
        train_x=_read_images(train_paths),
        train_y=train_y,
        test_x=_read_images(test_paths),
        test_y=test_y,
        num_classes=len(wnids),
        augment=AUGMENT,
    )
