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

import torch

from heterofl_edge.data.base import ClassificationData
from heterofl_edge.data.image_arrays import IMAGE_SUFFIXES, list_images, read_image_folder

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image_folder"]


def load_image_folder(
    data_dir: str | Path | None, size: int = 32, channels: int = 3
) -> ClassificationData:
    """The train and test images as [N, channels, size, size] float32, standardised."""
    arrays = read_image_folder(data_dir, size, channels)
    return ClassificationData(
        torch.from_numpy(arrays.train_x),
        torch.from_numpy(arrays.train_y),
        torch.from_numpy(arrays.test_x),
        torch.from_numpy(arrays.test_y),
        len(arrays.classes),
        arrays.classes,
    )
