"""Data sets heterofl-edge reads: MNIST from its original idx files.

``heterofl_edge.data.idx`` needs numpy alone; the names below (torch tensors)
load on first use.
"""

from importlib import import_module
from typing import Any

__all__ = ["MNIST_FILES", "ClassificationData", "load_mnist", "read_idx"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("heterofl_edge.data.mnist"), name)
    raise AttributeError(f"module 'heterofl_edge.data' has no attribute {name!r}")
