"""What every device runtime promises, in numpy alone (no torch).

A device runtime wraps one level's exported programs (``OnnxLevel`` in
``device_sim``, the ExecuTorch one in ``exporter``): ``train`` runs E epochs
of local training and returns a ``LocalResult``; ``statistics`` returns the
sBN moments a device uploads, merged exactly from per-batch reports with
``merge_batch_statistics``. ``training_batches`` is the order and content of a
session's batches for every runtime: the examples as they are, or, for a
masked language model, token rows with masks drawn as the simulation draws
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from heterofl_edge.batching import epoch_batches
from heterofl_edge.masking import TokenMasker

__all__ = [
    "LevelRuntime",
    "LocalResult",
    "RuntimeFactory",
    "TrainingBatch",
    "TrainingRequest",
    "merge_batch_statistics",
    "merge_moments",
    "training_batches",
]


@dataclass(frozen=True)
class LocalResult:
    weights: dict[str, np.ndarray]
    num_examples: int
    steps: int
    loss: float
    accuracy: float


@dataclass(frozen=True)
class TrainingRequest:
    """One local session: what every runtime's ``train`` takes.

    ``weights`` are the level's trainable tensors to start from, ``x`` and ``y``
    the device's examples (for a masked language model, ``y`` holds the token
    rows), ``labels`` the labels it holds (its label mask), and ``lr``,
    ``epochs``, ``batch_size`` and ``seed`` (the batch order) come from the task.
    """

    weights: dict[str, np.ndarray]
    x: np.ndarray
    y: np.ndarray
    labels: list[int]
    lr: float
    epochs: int
    batch_size: int
    seed: int


@dataclass(frozen=True)
class TrainingBatch:
    inputs: np.ndarray
    targets: np.ndarray
    scored: int  # targets that count in the loss: weigh the step's mean loss by it


def training_batches(
    manifest: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    seed: int,
) -> Iterator[TrainingBatch]:
    """A local session's batches, in the order ``epoch_batches(seed)`` gives.

    For a manifest with ``masked_language_model``, ``y`` holds the token rows:
    each batch is masked by one ``TokenMasker`` seeded with ``seed`` (as
    ``LanguageModelTask.train_local`` does), and a batch with nothing to score
    is skipped, as there.
    """
    settings = manifest.get("masked_language_model")
    masker = (
        None
        if settings is None
        else TokenMasker(
            int(settings["mask_token"]),
            float(settings["mask_rate"]),
            settings["scored_positions"],
            seed,
        )
    )
    for batch in epoch_batches(len(y), epochs, batch_size, seed):
        if masker is None:
            yield TrainingBatch(x[batch], y[batch], len(batch))
            continue
        masked = masker.corrupt(y[batch])
        if masked.scored:
            yield TrainingBatch(masked.inputs, masked.targets, masked.scored)


class LevelRuntime(Protocol):
    """One level's programs, loaded from the folder its manifest is in."""

    manifest: dict[str, Any]

    def train(self, request: TrainingRequest) -> LocalResult:
        """E local epochs from ``request.weights``; the trained weights and the metrics."""

    def statistics(
        self, weights: dict[str, np.ndarray], x: np.ndarray
    ) -> dict[str, np.ndarray]: ...


class RuntimeFactory(Protocol):
    """A runtime class (or function) taking the level's artifact folder."""

    def __call__(self, folder: Path, /) -> LevelRuntime: ...


def merge_moments(
    a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]
) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, biased var) of the union of two disjoint sets (Chan et al.)."""
    na, ma, va = a
    nb, mb, vb = b
    n = na + nb
    delta = mb.astype(np.float64) - ma
    mean = ma + delta * (nb / n)
    m2 = va * na + vb.astype(np.float64) * nb + delta**2 * (na * nb / n)
    return n, mean, m2 / n


def merge_batch_statistics(
    layers: list[str], reports: Iterable[tuple[int, Sequence[Any]]]
) -> dict[str, np.ndarray]:
    """Merge a statistics program's per-batch outputs into the upload's tensors.

    Each report is (examples in the batch, [mean_1, var_1, ..., mean_L, var_L]);
    the result holds LAYER.count / .mean / .var for every sBN layer.
    """
    merged: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for examples, out in reports:
        for i, layer in enumerate(layers):
            moments = (
                examples,
                np.asarray(out[2 * i], np.float64),
                np.asarray(out[2 * i + 1], np.float64),
            )
            merged[layer] = merge_moments(merged[layer], moments) if layer in merged else moments
    result: dict[str, np.ndarray] = {}
    for layer, (count, mean, var) in merged.items():
        result[f"{layer}.count"] = np.array(float(count), np.float32)
        result[f"{layer}.mean"] = mean.astype(np.float32)
        result[f"{layer}.var"] = var.astype(np.float32)
    return result
