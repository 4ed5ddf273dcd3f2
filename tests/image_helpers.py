"""Test data as image folders (no CIFAR-10 here: MNIST written out as images)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_mnist_as_images(mnist_dir: Path, root: Path, train: int, test: int) -> None:
    """The first MNIST examples as 32x32 RGB PNGs in root/{train,test}/DIGIT/."""
    from PIL import Image

    def read(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.decompress((mnist_dir / name).read_bytes())[offset:], np.uint8)

    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8)
        for i in range(count):
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            picture = Image.fromarray(images[i]).convert("RGB")
            picture.resize((32, 32), Image.Resampling.BILINEAR).save(folder / f"{i:05d}.png")
