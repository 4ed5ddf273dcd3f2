"""Image folders read into numpy arrays, without torch (the device client reads them too).

Layout and preprocessing: see ``heterofl_edge.data.imagefolder``. Pillow is
the one extra package (the ``images`` extra; the ``server`` extra has it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heterofl_edge.errors import DataError, MissingExtra

__all__ = ["IMAGE_SUFFIXES", "ImageArrays", "list_images", "read_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HINT = (
    "pass --data-dir DIR holding train/CLASS/*.png and test/CLASS/*.png "
    "(PNG or JPEG, one folder per class)"
)


@dataclass(frozen=True)
class ImageArrays:
    """Standardised [N, channels, size, size] float32 images, int64 labels, class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


def list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """Class names (sorted folder names) and every (image, class name) of one split."""
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} does not exist", HINT)
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders", HINT)
    images = []
    for name in classes:
        files = sorted(
            p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(f"class folder {split_dir / name} holds no PNG or JPEG files", HINT)
        images += [(p, name) for p in files]
    return classes, images


def _read(files: list[tuple[Path, str]], size: int, channels: int) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ModuleNotFoundError:
        raise MissingExtra("images", "reading an image folder") from None

    mode = "RGB" if channels == 3 else "L"
    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as image:
                picture = image.convert(mode)
                if picture.size != (size, size):
                    picture = picture.resize((size, size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(picture).reshape(size, size, channels)
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(
                f"cannot read image {path}: {exc}", "remove or replace the file"
            ) from None
    return out


def read_image_folder(
    data_dir: str | Path | None, size: int = 32, channels: int = 3, *, test: bool = True
) -> ImageArrays:
    """Train (and, with ``test``, test) images standardised with the training statistics."""
    if data_dir is None or str(data_dir) == "":
        raise DataError("no image folder given", HINT)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise DataError(f"image size must be at least 1, got {size}")
    root = Path(data_dir).expanduser()
    classes, train_files = list_images(root / "train")
    test_files: list[tuple[Path, str]] = []
    if test:
        test_classes, test_files = list_images(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise DataError(
                f"test classes {unknown[:3]} have no training folder in {root / 'train'}",
                "give train/ and test/ the same class folders",
            )
    index = {name: i for i, name in enumerate(classes)}
    train = _read(train_files, size, channels).astype(np.float32) / np.float32(255.0)
    mean = train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = train.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = np.where(std > 0, std, np.float32(1.0))

    def standardised(pixels: np.ndarray) -> np.ndarray:
        pixels -= mean
        pixels /= std
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))

    def labels(files: list[tuple[Path, str]]) -> np.ndarray:
        return np.array([index[name] for _, name in files], dtype=np.int64)

    test_pixels = (
        _read(test_files, size, channels).astype(np.float32) / np.float32(255.0)
        if test
        else np.empty((0, size, size, channels), np.float32)
    )
    return ImageArrays(
        standardised(train),
        labels(train_files),
        standardised(test_pixels),
        labels(test_files),
        tuple(classes),
    )
