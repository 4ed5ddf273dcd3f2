"""Data sets heterofl-edge reads: MNIST from its original idx files."""

from heterofl_edge.data.mnist import (
    MNIST_FILES,
    ClassificationData,
    load_mnist,
    read_idx,
)

__all__ = ["MNIST_FILES", "ClassificationData", "load_mnist", "read_idx"]
