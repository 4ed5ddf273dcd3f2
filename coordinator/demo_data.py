"""Demo data for browser devices: each gets a deterministic shard of the run's data set.

Off by default (``--demo-data DIR``). A real phone keeps its own data; this lets
a demo (or a test) open the device page without picking files. The data set is
the coordinator's ``--data`` (MNIST by default; any classification data set the
registry knows, loaded to fit the model's input). Shards are the ones the
Python devices compute themselves (``heterofl_edge.partition.train_shards`` from
the same seed), so a browser device and a Python device with the same shard
train on the same examples.

Shards travel compactly: where the data set has a raw pixel form (MNIST, an
image folder) ``x`` is uint8 ``[N, C, H, W]`` and the metadata's ``normalise``
says how the device turns it into the model's float32 input,
``(fround(p / scale) - fround(mean_c)) / fround(std_c)`` with every operation
rounded to float32, which gives the loader's bits exactly (checked at start-up
on the whole training set: a data set whose loader the formula does not
reproduce is served as float32). Other data sets (a user's loader) are served
as the loader's float32 ``x`` without ``normalise``.

A shard above ``max_examples`` is refused (``demo_shard_too_large``); encoded
shards are kept in a small LRU cache bounded in bytes, built under one lock so
that concurrent requests for a shard build it once.
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.data.idx import MNIST_MEAN, MNIST_STD, locate, read_idx, read_split
from heterofl_edge.errors import ConfigError, HeteroFLError
from heterofl_edge.models import Architecture
from heterofl_edge.partition import Split, train_shards

__all__ = [
    "DEFAULT_CLIENTS",
    "MAX_EXAMPLES",
    "DemoData",
    "Normalise",
    "ShardQuery",
]

DEFAULT_CLIENTS = 100  # the paper's client count: the default demo shard is 1/100 of the set
MAX_EXAMPLES = 10_000  # the largest shard served (MNIST: 7.5 MiB of uint8 pixels)
CACHE_BYTES = 64 * 2**20  # encoded shards kept (at least the last one)
_CHECK_ROWS = 4096  # rows per chunk of the start-up check


@dataclass(frozen=True)
class Normalise:
    """How a device turns uint8 pixels into the model's input: per channel, in float32."""

    scale: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> str:
        """The metadata string: ``{"scale": 255, "mean": [...], "std": [...]}``."""
        return json.dumps({"scale": self.scale, "mean": list(self.mean), "std": list(self.std)})

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """float32 ``(p / scale - mean_c) / std_c`` of uint8 ``[N, C, ...]``, each step in float32.

        This is what the device computes (``web/mnist.js`` ``standardise``); a
        256-entry table per channel holds the results.
        """
        channels = len(self.mean)
        if pixels.ndim < 2 or pixels.shape[1] != channels:
            raise ValueError(f"pixels {pixels.shape} do not have {channels} channel(s)")
        values = np.arange(256, dtype=np.float32) / np.float32(self.scale)
        table = np.stack(
            [(values - np.float32(self.mean[c])) / np.float32(self.std[c]) for c in range(channels)]
        )
        index = np.arange(channels).reshape((1, channels) + (1,) * (pixels.ndim - 2))
        return table[index, pixels]


@dataclass(frozen=True)
class ShardQuery:
    """Which shard of which split: the query of ``GET /v1/demo-data``."""

    shard: int = 0
    clients: int = DEFAULT_CLIENTS
    split: str = "iid"
    seed: int = 0
    train_examples: int | None = None


@dataclass(frozen=True)
class _Encoded:
    payload: bytes
    info: dict[str, Any]


class DemoData:
    """The training split of data set ``data`` in ``data_dir``, loaded once, at start-up."""

    def __init__(
        self,
        data_dir: Path,
        data: str = "mnist",
        arch: Architecture | None = None,
        max_examples: int = MAX_EXAMPLES,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.source = data
        self.max_examples = max_examples
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[ShardQuery, _Encoded] = OrderedDict()
        self._lock = threading.Lock()
        self.normalise: Normalise | None = None
        self.pixels: np.ndarray | None = None  # uint8 [N, C, H, W] where there is a raw form
        self.images: np.ndarray | None = None  # float32 [N, ...] otherwise
        if data == "mnist":
            images, self.labels = read_split(data_dir, "train")
            self.num_classes = 10
            raw = read_idx(locate(data_dir, "train-images-idx3-ubyte"))[:, None]
            self._use_pixels(images, raw, Normalise(255, (MNIST_MEAN,), (MNIST_STD,)))
            return
        from heterofl_edge.data.base import LanguageModelData
        from heterofl_edge.data.registry import get_dataset, resolve_dataset

        loaded = get_dataset(data, data_dir, fit_to=None if arch is None else arch.input_shape)
        if isinstance(loaded, LanguageModelData):
            raise ConfigError(
                f"--demo-data serves classification data; {data!r} is language-model data",
                "leave --demo-data out for this run",
            )
        images = loaded.train_x.numpy()
        self.labels = loaded.train_y.numpy()
        self.num_classes = loaded.num_classes
        if resolve_dataset(data).name == "imagefolder" and images.ndim == 4:
            raw, normalise = _image_folder_pixels(data_dir, images.shape[2], images.shape[1])
            self._use_pixels(images, raw, normalise)
        else:
            self.images = images

    def _use_pixels(self, images: np.ndarray, raw: np.ndarray, normalise: Normalise) -> None:
        """Serve ``raw`` if the device's formula gives ``images`` bit for bit, else ``images``."""
        if raw.shape == images.shape and all(
            np.array_equal(
                normalise.apply(raw[i : i + _CHECK_ROWS]).view(np.uint32),
                images[i : i + _CHECK_ROWS].view(np.uint32),
            )
            for i in range(0, len(raw), _CHECK_ROWS)
        ):
            self.pixels = np.ascontiguousarray(raw)
            self.normalise = normalise
        else:
            self.images = images

    @property
    def example_shape(self) -> tuple[int, ...]:
        array = self.pixels if self.pixels is not None else self.images
        assert array is not None
        return tuple(int(d) for d in array.shape[1:])

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one instance per coordinator
    def _partition(
        self, clients: int, split: Split, seed: int, train_examples: int | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        keep, shards = train_shards(
            self.labels, clients, split, self.num_classes, seed, train_examples=train_examples
        )
        return keep, shards.indices

    def _chosen(self, query: ShardQuery) -> np.ndarray:
        """Indices of the shard's examples; ``ApiError`` for a shard that cannot be served."""
        if not 0 <= query.shard < query.clients:
            raise ApiError(
                ErrorCode.invalid_request,
                f"shard {query.shard} is outside 0..{query.clients - 1}",
                f"pick a shard from 0 to {query.clients - 1}",
            )
        if query.train_examples is not None and query.train_examples < query.clients:
            raise ApiError(
                ErrorCode.invalid_request,
                f"{query.train_examples} examples cannot be shared by {query.clients} devices",
            )
        try:
            keep, indices = self._partition(
                query.clients, Split(query.split), query.seed, query.train_examples
            )
        except HeteroFLError as exc:
            raise ApiError(ErrorCode.invalid_request, exc.message, exc.hint) from None
        chosen = keep[indices[query.shard]]
        if len(chosen) > self.max_examples:
            total = len(keep)
            raise ApiError(
                ErrorCode.demo_shard_too_large,
                f"demo shard {query.shard} of {query.clients} holds {len(chosen)} examples; "
                f"this coordinator serves at most {self.max_examples}",
                f"ask for a smaller shard: clients={math.ceil(total / self.max_examples)} or more",
            )
        return chosen

    def _encoded(self, query: ShardQuery) -> _Encoded:
        with self._lock:
            hit = self._cache.get(query)
            if hit is not None:
                self._cache.move_to_end(query)
                return hit
            chosen = self._chosen(query)
            metadata = {
                "source": f"the {self.source} training set",
                "shard": f"{query.shard} of {query.clients} ({query.split}, seed {query.seed})",
            }
            if self.pixels is not None and self.normalise is not None:
                x = np.ascontiguousarray(self.pixels[chosen])
                metadata["normalise"] = self.normalise.to_json()
            else:
                assert self.images is not None
                x = np.ascontiguousarray(self.images[chosen])
            payload = save({"x": x, "y": np.ascontiguousarray(self.labels[chosen])}, metadata)
            encoded = _Encoded(
                payload,
                {
                    "examples": len(chosen),
                    "bytes": len(payload),
                    "shape": list(x.shape),
                    "dtype": "uint8" if x.dtype == np.uint8 else "float32",
                    "shard": query.shard,
                    "clients": query.clients,
                    "split": query.split,
                    "seed": query.seed,
                    "source": metadata["source"],
                },
            )
            self._cache[query] = encoded
            held = sum(len(e.payload) for e in self._cache.values())
            while len(self._cache) > 1 and held > self._cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                held -= len(dropped.payload)
            return encoded

    def shard(self, query: ShardQuery) -> bytes:
        """Safetensors ``x`` (uint8 pixels or the loader's float32) and ``y`` int64 [N]."""
        return self._encoded(query).payload

    def info(self, query: ShardQuery) -> dict[str, Any]:
        """What ``shard(query)`` sends: examples, bytes, shape, dtype, shard, clients, source."""
        return dict(self._encoded(query).info)


def _image_folder_pixels(data_dir: Path, size: int, channels: int) -> tuple[np.ndarray, Normalise]:
    """uint8 ``[N, C, H, W]`` training images and the statistics ``read_image_folder`` uses."""
    # _read is read_image_folder's own reader: the same decoding, resizing and order.
    from heterofl_edge.data.image_arrays import _read, list_images

    _, files = list_images(Path(data_dir).expanduser() / "train")
    raw = _read(files, size, channels)  # [N, H, W, C], the order read_image_folder reads
    scaled = raw.astype(np.float32) / np.float32(255.0)
    mean = scaled.mean(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = scaled.std(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    std = np.where(std > 0, std, np.float32(1.0))
    del scaled
    normalise = Normalise(255, tuple(map(float, mean)), tuple(map(float, std)))
    return np.ascontiguousarray(raw.transpose(0, 3, 1, 2)), normalise
