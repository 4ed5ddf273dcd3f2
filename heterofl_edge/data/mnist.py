"""MNIST read from the four original idx files, with clear errors when they are not there.

The directory is always given by the caller (a CLI option or the
``HETEROFL_DATA_DIR`` environment variable); nothing here knows where the
files live. Both the ``.gz`` files and their unpacked forms are accepted,
which covers a folder filled by torchvision's downloader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from heterofl_edge.data.base import ClassificationData, md5_of
from heterofl_edge.data.idx import DOWNLOAD_HINT, read_idx, read_split
from heterofl_edge.errors import DataError

__all__ = [
    "MNIST_FILES",
    "ClassificationData",
    "check_mnist_files",
    "load_mnist",
    "md5_of",
    "read_idx",
]

# file name -> md5 of the original .gz distribution file
MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def load_mnist(data_dir: str | Path | None) -> ClassificationData:
    """MNIST train and test, normalised with the usual mean 0.1307 and std 0.3081."""
    if data_dir is None or str(data_dir) == "":
        raise DataError("no MNIST directory given", DOWNLOAD_HINT)
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"MNIST directory {folder} does not exist", DOWNLOAD_HINT)
    splits = [read_split(folder, prefix) for prefix in ("train", "t10k")]
    (train_x, train_y), (test_x, test_y) = (
        (torch.from_numpy(x), torch.from_numpy(y)) for x, y in splits
    )
    return ClassificationData(train_x, train_y, test_x, test_y, 10)


def check_mnist_files(data_dir: str | Path) -> dict[str, str]:
    """md5 of each ``.gz`` file against the original distribution: name -> 'ok' or a problem."""
    folder = Path(data_dir).expanduser()
    report = {}
    for stem, expected in MNIST_FILES.items():
        path = folder / f"{stem}.gz"
        if not path.is_file():
            report[path.name] = "missing"
        else:
            actual = md5_of(path)
            report[path.name] = "ok" if actual == expected else f"md5 {actual}, expected {expected}"
    return report
