"""Data sets heterofl-edge reads, by name (``get_dataset``) or by loader.

``heterofl_edge.data.idx`` needs numpy alone (the device runtime reads MNIST
with it); the names below use torch and load on first use.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MNIST_FILES": "mnist",
    "ClassificationData": "base",
    "DATA_ENTRY_POINT_GROUP": "registry",
    "DatasetEntry": "registry",
    "LanguageModelData": "base",
    "TaskData": "base",
    "WIKITEXT2_FILES": "wikitext2",
    "get_dataset": "registry",
    "list_datasets": "registry",
    "load_image_folder": "imagefolder",
    "load_mnist": "mnist",
    "load_wikitext2": "wikitext2",
    "read_idx": "mnist",
    "register_dataset": "registry",
    "resolve_dataset": "registry",
    "validate_data": "base",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"heterofl_edge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'heterofl_edge.data' has no attribute {name!r}")
