"""Demo data for browser devices: each gets a deterministic shard of the run's data set.

Off by default (``--demo-data DIR``). A real phone keeps its own data; this lets
a demo (or a test) open the device page without picking files. The data set is
the coordinator's ``--data`` (MNIST by default; any classification data set the
registry knows, loaded to fit the model's input). Shards are the ones the
Python devices compute themselves (``heterofl_edge.partition.train_shards`` from
the same seed), so a browser device and a Python device with the same shard
train on the same examples.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.data.idx import read_split
from heterofl_edge.errors import ConfigError, HeteroFLError
from heterofl_edge.models import Architecture
from heterofl_edge.partition import Split, train_shards

__all__ = ["DemoData"]


class DemoData:
    """The training split of data set ``data`` in ``data_dir``, loaded once, at start-up."""

    def __init__(
        self, data_dir: Path, data: str = "mnist", arch: Architecture | None = None
    ) -> None:
        self.source = data
        if data == "mnist":
            self.images, self.labels = read_split(data_dir, "train")
            self.num_classes = 10
            return
        from heterofl_edge.data.base import LanguageModelData
        from heterofl_edge.data.registry import get_dataset

        loaded = get_dataset(data, data_dir, fit_to=None if arch is None else arch.input_shape)
        if isinstance(loaded, LanguageModelData):
            raise ConfigError(
                f"--demo-data serves classification data; {data!r} is language-model data",
                "leave --demo-data out for this run",
            )
        self.images = loaded.train_x.numpy()
        self.labels = loaded.train_y.numpy()
        self.num_classes = loaded.num_classes

    @functools.lru_cache(maxsize=16)  # noqa: B019 - one instance per coordinator
    def _partition(
        self, clients: int, split: Split, seed: int, train_examples: int | None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        keep, shards = train_shards(
            self.labels, clients, split, self.num_classes, seed, train_examples=train_examples
        )
        return keep, shards.indices

    def shard(
        self, shard: int, clients: int, split: str, seed: int, train_examples: int | None
    ) -> bytes:
        """Safetensors ``x`` float32 [N, ...] (as the data set's loader gives it), ``y`` [N]."""
        if not 0 <= shard < clients:
            raise ApiError(ErrorCode.invalid_request, f"shard {shard} is outside 0..{clients - 1}")
        if train_examples is not None and train_examples < clients:
            raise ApiError(
                ErrorCode.invalid_request,
                f"{train_examples} examples cannot be shared by {clients} devices",
            )
        try:
            keep, indices = self._partition(clients, Split(split), seed, train_examples)
        except HeteroFLError as exc:
            raise ApiError(ErrorCode.invalid_request, exc.message, exc.hint) from None
        chosen = keep[indices[shard]]
        return save(
            {
                "x": np.ascontiguousarray(self.images[chosen]),
                "y": np.ascontiguousarray(self.labels[chosen]),
            },
            metadata={
                "source": f"the {self.source} training set",
                "shard": f"{shard} of {clients} ({split}, seed {seed})",
            },
        )
