"""A data set in the user's own format: two CSV files of 16 features and a label.

``load(data_dir)`` is the loader heterofl-edge calls (``--data tiny-blobs``, or
``--data tiny_mlp.data:load`` without installing). It reads ``train.csv`` and
``test.csv`` (header ``f0,...,f15,label``) and returns a ``ClassificationData``.
``python -m tiny_mlp.data DIR`` writes such files: four Gaussian clusters in
16 dimensions, 2,000 training and 400 test rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from heterofl_edge.data import ClassificationData
from heterofl_edge.errors import DataError

NUM_FEATURES, NUM_CLASSES = 16, 4


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path} not found", "write the files with: python -m tiny_mlp.data DIR")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    if table.shape[1] != NUM_FEATURES + 1:
        raise DataError(f"{path} has {table.shape[1]} columns, expected {NUM_FEATURES + 1}")
    features = torch.from_numpy(np.ascontiguousarray(table[:, :NUM_FEATURES]))
    return features, torch.from_numpy(table[:, NUM_FEATURES].astype(np.int64))


def load(data_dir: str | Path | None) -> ClassificationData:
    """Tiny blobs: 16 features, 4 classes, from train.csv and test.csv."""
    if data_dir is None:
        raise DataError("no data folder given", "pass --data-dir DIR")
    folder = Path(data_dir)
    train_x, train_y = _read(folder / "train.csv")
    test_x, test_y = _read(folder / "test.csv")
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp(min=1e-6)
    return ClassificationData(
        (train_x - mean) / std, train_y, (test_x - mean) / std, test_y, NUM_CLASSES
    )


def write_blobs(folder: Path, train: int = 2000, test: int = 400, seed: int = 0) -> None:
    """Four overlapping Gaussian clusters in 16 dimensions, as CSV files."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, size=(NUM_CLASSES, NUM_FEATURES))
    folder.mkdir(parents=True, exist_ok=True)
    header = ",".join([f"f{i}" for i in range(NUM_FEATURES)] + ["label"])
    for name, count in (("train.csv", train), ("test.csv", test)):
        labels = rng.integers(0, NUM_CLASSES, size=count)
        features = centres[labels] + rng.normal(0.0, 2.0, size=(count, NUM_FEATURES))
        table = np.column_stack([features, labels])
        fmt = ["%.5f"] * NUM_FEATURES + ["%d"]
        np.savetxt(folder / name, table, delimiter=",", header=header, comments="", fmt=fmt)


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
    write_blobs(target)
    print(f"wrote {target / 'train.csv'} and {target / 'test.csv'}")
