"""Images in class folders: how a user brings CIFAR-10, or any labelled image set.

Layout (PNG or JPEG files, any names; the class names are the folder names,
numbered 0, 1, ... in sorted order)::

    DIR/train/airplane/0001.png
    DIR/train/automobile/0002.png
    ...
    DIR/test/airplane/0001.png
    ...

Every image is read with Pillow, converted to RGB (``channels=3``) or
greyscale (``channels=1``), resized to ``size`` x ``size`` pixels with bilinear
filtering if it has another size, scaled to [0, 1], then standardised per
channel with the mean and standard deviation of the *training* images. For
CIFAR-10 those are the usual (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435,
0.2616). The test images use the training statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from heterofl_edge.data.base import ClassificationData
from heterofl_edge.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HINT = (
    "pass --data-dir DIR holding train/CLASS/*.png and test/CLASS/*.png "
    "(PNG or JPEG, one folder per class)"
)


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
    from PIL import Image, UnidentifiedImageError

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


def load_image_folder(
    data_dir: str | Path | None, size: int = 32, channels: int = 3
) -> ClassificationData:
    """The train and test images as [N, channels, size, size] float32, standardised."""
    if data_dir is None or str(data_dir) == "":
        raise DataError("no image folder given", HINT)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise DataError(f"image size must be at least 1, got {size}")
    root = Path(data_dir).expanduser()
    classes, train_files = list_images(root / "train")
    test_classes, test_files = list_images(root / "test")
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataError(
            f"test classes {unknown[:3]} have no training folder in {root / 'train'}",
            "give train/ and test/ the same class folders",
        )
    index = {name: i for i, name in enumerate(classes)}
    train = _read(train_files, size, channels).astype(np.float32) / np.float32(255.0)
    test = _read(test_files, size, channels).astype(np.float32) / np.float32(255.0)
    mean = train.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = train.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = np.where(std > 0, std, np.float32(1.0))

    def tensor(pixels: np.ndarray) -> torch.Tensor:
        pixels -= mean
        pixels /= std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    def labels(files: list[tuple[Path, str]]) -> torch.Tensor:
        return torch.tensor([index[name] for _, name in files], dtype=torch.long)

    return ClassificationData(
        tensor(train),
        labels(train_files),
        tensor(test),
        labels(test_files),
        len(classes),
        tuple(classes),
    )
