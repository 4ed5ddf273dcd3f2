"""A data set's training split as plain arrays: what a device reads for any data set.

A device runs without torch, so it cannot call a data set's loader (the
registry's loaders return torch tensors, and a user's loader may need more).
``heterofl-edge data export`` runs the loader once, on a machine with the
``server`` extra, and writes ``train.safetensors``: ``x`` (float32 inputs,
``[N, ...]``, preprocessed as the loader does) and ``y`` (int64 labels,
``[N]``), with the number of classes in the metadata. ``heterofl-edge device
--data arrays`` reads it back with numpy. Classification data only: a device
reads WikiText-2's text itself (``--data wikitext2``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from heterofl_edge.errors import DataError

__all__ = ["ARRAYS_FILE", "read_training_arrays", "write_training_arrays"]

ARRAYS_FILE = "train.safetensors"
HINT = (
    "write the folder with 'heterofl-edge data export --data NAME --data-dir DIR --out FOLDER' "
    "on a machine with the server extra, and copy it to the device"
)


def write_training_arrays(
    folder: Path, x: np.ndarray, y: np.ndarray, num_classes: int, source: str
) -> Path:
    """Write ``folder/train.safetensors`` (whole or not at all); its path."""
    target = folder / ARRAYS_FILE
    partial = target.with_suffix(".partial")
    body = save(
        {"x": np.ascontiguousarray(x, np.float32), "y": np.ascontiguousarray(y, np.int64)},
        metadata={"num_classes": json.dumps(int(num_classes)), "source": source},
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(body)
        os.replace(partial, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise DataError(
            f"cannot write {target}: {exc.strerror or exc}", "--out must be a writable folder"
        ) from None
    return target


def read_training_arrays(folder: str | Path | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Inputs, labels and the number of classes from ``folder/train.safetensors``, checked."""
    if folder is None or str(folder) == "":
        raise DataError("no arrays folder given", HINT)
    path = Path(folder).expanduser() / ARRAYS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist", HINT)
    try:
        tensors = load_file(path)
        with safe_open(path, framework="numpy") as opened:
            metadata = opened.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read {path}: {exc}", HINT) from None
    text = metadata.get("num_classes", "")
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 10**7:
        raise DataError(f"{path}: its metadata must give num_classes, a positive integer", HINT)
    num_classes = int(text)
    x, y = tensors.get("x"), tensors.get("y")
    if x is None or y is None or set(tensors) != {"x", "y"}:
        raise DataError(f"{path} must hold exactly the arrays x and y", HINT)
    if (
        x.dtype != np.float32
        or x.ndim < 2
        or y.dtype != np.int64
        or y.ndim != 1
        or len(x) != len(y)
    ):
        raise DataError(
            f"{path}: x must be float32 [N, ...] and y int64 [N] (got {x.dtype} "
            f"{list(x.shape)}, {y.dtype} {list(y.shape)})",
            HINT,
        )
    if len(y) > 0 and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"{path}: labels must lie in 0..{num_classes - 1}", HINT)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: x holds NaN or Inf values", HINT)
    return x, y, num_classes
