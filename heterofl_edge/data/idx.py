"""The idx file format of MNIST, read with numpy alone (no torch).

Used by the library's MNIST loader and by the device runtime, which must run
without torch.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from heterofl_edge.errors import DataError

__all__ = ["MNIST_MEAN", "MNIST_STD", "locate", "normalise", "read_idx"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
DOWNLOAD_HINT = (
    "pass --data-dir DIR or set HETEROFL_DATA_DIR to a folder holding the four MNIST files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz); with internet, download them from "
    "https://ossci-datasets.s3.amazonaws.com/mnist/ and check them with "
    "'heterofl-edge data check --data-dir DIR'"
)


def locate(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem, data_dir / "MNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST file {stem}(.gz) not found in {data_dir}", DOWNLOAD_HINT)


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


def read_split(data_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalised images [N, 1, 28, 28] float32 and labels [N] int64 of 'train' or 't10k'."""
    images = read_idx(locate(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(locate(data_dir, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST {prefix} files disagree: images {images.shape}, labels {labels.shape}",
            "fetch both files again",
        )
    if labels.size and labels.max() > 9:
        raise DataError(
            f"MNIST {prefix} labels go up to {labels.max()}, expected 0..9", "fetch the file again"
        )
    return normalise(images)[:, None], labels.astype(np.int64)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 standardised with MNIST's mean and std."""
    x = images.astype(np.float32) / np.float32(255.0)
    return (x - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
