"""The data registry: one table from a name to a loader, on the pattern of the model registry.

* built-ins: ``mnist`` (idx files), ``wikitext2`` (word-level text),
  ``imagefolder`` (class folders of PNG or JPEG images);
* installed packages: an entry point in the group ``heterofl_edge.data``::

      [project.entry-points."heterofl_edge.data"]
      blobs = "tiny_mlp.data:load"

* a reference ``package.module:loader``.

A loader is ``loader(data_dir: Path | None, **options)`` and returns a
``ClassificationData`` or a ``LanguageModelData`` (``heterofl_edge.data.base``);
what it returns is checked (shapes, dtypes, label range) before use. A built-in
whose loader can shape its examples (an image folder's size and channels,
WikiText-2's row length) says how in ``DatasetEntry.fit``, so that
``get_dataset(..., fit_to=arch.input_shape)`` loads it in the model's shape.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from heterofl_edge.data.base import TaskData, validate_data
from heterofl_edge.data.imagefolder import load_image_folder
from heterofl_edge.data.mnist import check_mnist_files, load_mnist
from heterofl_edge.data.wikitext2 import check_wikitext2_files, load_wikitext2
from heterofl_edge.errors import ConfigError
from heterofl_edge.task_kind import TaskKind

__all__ = [
    "DATA_ENTRY_POINT_GROUP",
    "DatasetEntry",
    "get_dataset",
    "list_datasets",
    "register_dataset",
    "resolve_dataset",
]

DATA_ENTRY_POINT_GROUP = "heterofl_edge.data"
DataLoader = Callable[..., Any]
# One example's shape (without the batch dimension) -> the loader options that give it.
ShapeOptions = Callable[[tuple[int, ...]], dict[str, Any]]
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class DatasetEntry:
    """A data set by name: its loader, and an md5 check of its files where they are known."""

    name: str
    description: str
    loader: DataLoader
    check_files: Callable[[Path], dict[str, str]] | None = None
    task: TaskKind | None = None
    source: str = "built-in"
    fit: ShapeOptions | None = None


_BUILT_IN: dict[str, DatasetEntry] = {}


def _image_options(shape: tuple[int, ...]) -> dict[str, Any]:
    """(C, H, H) with C 1 or 3 -> ``channels`` and ``size``; other shapes: the defaults."""
    if len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2]:
        return {"channels": shape[0], "size": shape[1]}
    return {}


def _text_options(shape: tuple[int, ...]) -> dict[str, Any]:
    """(S,) -> rows of ``sequence_length`` S."""
    return {"sequence_length": shape[0]} if len(shape) == 1 else {}


def register_dataset(entry: DatasetEntry) -> None:
    """Add a built-in data set to the table."""
    _BUILT_IN[entry.name] = entry


register_dataset(
    DatasetEntry(
        "mnist",
        "MNIST digits from the four idx files (60,000 / 10,000, 1x28x28)",
        load_mnist,
        check_mnist_files,
        TaskKind.classification,
    )
)
register_dataset(
    DatasetEntry(
        "wikitext2",
        "WikiText-2 words, official-code vocabulary (33,279), rows of 64 tokens",
        load_wikitext2,
        check_wikitext2_files,
        TaskKind.language_model,
        fit=_text_options,
    )
)
register_dataset(
    DatasetEntry(
        "imagefolder",
        "train/CLASS/*.png|jpg and test/CLASS/*, resized to 32x32 RGB, standardised",
        load_image_folder,
        None,
        TaskKind.classification,
        fit=_image_options,
    )
)


def _entry_points() -> dict[str, list[metadata.EntryPoint]]:
    found: dict[str, list[metadata.EntryPoint]] = {}
    for point in metadata.entry_points(group=DATA_ENTRY_POINT_GROUP):
        found.setdefault(point.name, []).append(point)
    return found


def list_datasets() -> list[str]:
    """Names ``get_dataset`` accepts: the built-ins, then installed entry points."""
    return list(_BUILT_IN) + sorted(n for n in _entry_points() if n not in _BUILT_IN)


def _load(point: metadata.EntryPoint, what: str) -> Any:
    module_name = point.value.split(":", 1)[0]
    try:
        return point.load()
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import {exc.name or module_name!r} for data set {what!r}",
            "install the package or run from the folder that holds it (or set PYTHONPATH)",
        ) from None
    except AttributeError:
        raise ConfigError(
            f"{point.value!r} names nothing", "check the name after the colon"
        ) from None


def resolve_dataset(name: str) -> DatasetEntry:
    """The data set called ``name``; ``ConfigError`` listing the choices if there is none."""
    key = str(getattr(name, "value", name)).strip()
    if key in _BUILT_IN:
        return _BUILT_IN[key]
    points = _entry_points().get(key)
    if points:
        if len({p.value for p in points}) > 1:
            raise ConfigError(
                f"data set {key!r} is declared by several installed packages",
                "uninstall one of them or use package.module:loader",
            )
        dist = points[0].dist
        loader = _load(points[0], key)
        source = f"entry point ({dist.name if dist is not None else 'unknown package'})"
    elif ":" in key:
        if not _REFERENCE.match(key):
            raise ConfigError(
                f"data reference {key!r} is not of the form package.module:loader",
                "name a callable loader(data_dir, **options), e.g. my_data.csv:load",
            )
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        loader = _load(metadata.EntryPoint(key, key, DATA_ENTRY_POINT_GROUP), key)
        source = "module:loader"
    else:
        choices = ", ".join(list_datasets()) + ", or package.module:loader"
        raise ConfigError(f"unknown data set {key!r}", f"choose one of: {choices}")
    if not callable(loader):
        raise ConfigError(f"data set {key!r} names a {type(loader).__name__}, not a loader")
    doc = (getattr(loader, "__doc__", None) or key).strip().splitlines()[0]
    return DatasetEntry(key, doc, loader, None, None, source)


def get_dataset(
    name: str,
    data_dir: str | Path | None,
    *,
    fit_to: tuple[int, ...] | None = None,
    **options: Any,
) -> TaskData:
    """Load and check the data set ``name`` from ``data_dir``; ``options`` go to its loader.

    ``fit_to`` (a model's input shape) adds the options that shape the examples
    that way, for a data set that can (``DatasetEntry.fit``); ``options`` win.
    """
    entry = resolve_dataset(name)
    if fit_to is not None and entry.fit is not None:
        options = {**entry.fit(tuple(fit_to)), **options}
    try:
        data = entry.loader(data_dir, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise ConfigError(f"data set {entry.name!r} does not take {exc}") from None
        raise
    return validate_data(data, entry.name)
