"""MNIST read from the four original idx files, with clear errors when they are not there.

The directory is always given by the caller (a CLI option or the
``HETEROFL_DATA_DIR`` environment variable); nothing here knows where the
files live. Both the ``.gz`` files and their unpacked forms are accepted,
which covers a folder filled by torchvision's downloader.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_DOWNLOAD_HINT = (
    "pass --data-dir DIR or set HETEROFL_DATA_DIR to a folder holding the four MNIST files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz); with internet, download them from "
    "https://ossci-datasets.s3.amazonaws.com/mnist/ and check them with "
    "'heterofl-edge data check --data-dir DIR'"
)


@dataclass(frozen=True)
class ClassificationData:
    """Normalised images [N, C, H, W] float32 and labels [N] int64, train and test."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _locate(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem, data_dir / "MNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {stem}(.gz) not found in {data_dir}", _DOWNLOAD_HINT)


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (gzip-compressed or not); ``DataError`` if it is corrupt."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"cannot read {path}: {exc}", "the file is damaged; fetch it again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an unsigned-byte idx file (bad magic number)",
            "the file is damaged or is not MNIST; fetch it again",
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path} has a truncated idx header", "fetch the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes, its header promises {expected}",
            "the file is truncated or damaged; fetch it again",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _split(data_dir: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_locate(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_locate(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST {prefix} files disagree: images {images.shape}, labels {labels.shape}",
            "fetch both files again",
        )
    if labels.size and labels.max() > 9:
        raise DataError(
            f"MNIST {prefix} labels go up to {labels.max()}, expected 0..9", "fetch the file again"
        )
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(labels.astype(np.int64))


def load_mnist(data_dir: str | Path | None) -> ClassificationData:
    """MNIST train and test, normalised with the usual mean 0.1307 and std 0.3081."""
    if data_dir is None or str(data_dir) == "":
        raise DataError("no MNIST directory given", _DOWNLOAD_HINT)
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"MNIST directory {folder} does not exist", _DOWNLOAD_HINT)
    train_x, train_y = _split(folder, "train")
    test_x, test_y = _split(folder, "t10k")
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
