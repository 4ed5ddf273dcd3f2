"""Splitting a data set across clients.

Labelled examples: IID, or balanced non-IID shards; a language model's token
rows: contiguous stretches (``stretch_partition``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from heterofl_edge.errors import ConfigError

__all__ = [
    "FederatedSplit",
    "Partition",
    "Split",
    "federated_split",
    "iid_partition",
    "shard_partition",
    "split_by_labels",
    "stretch_partition",
    "train_shards",
]


class Split(StrEnum):
    iid = "iid"
    non_iid = "non-iid"


@dataclass(frozen=True)
class Partition:
    """Per-client example indices and the labels each client holds."""

    indices: list[np.ndarray]
    labels: list[list[int]]

    @property
    def num_clients(self) -> int:
        return len(self.indices)


def _check_clients(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients}")
    if num_clients > num_examples:
        raise ConfigError(
            f"{num_clients} clients for {num_examples} examples",
            "use fewer clients or more data: every client needs an example",
        )


def iid_partition(targets: np.ndarray, num_clients: int, rng: np.random.Generator) -> Partition:
    """Equal random shares of ``len // num_clients`` examples each, without overlap."""
    _check_clients(len(targets), num_clients)
    share = len(targets) // num_clients
    order = rng.permutation(len(targets))
    indices = [np.sort(order[i * share : (i + 1) * share]) for i in range(num_clients)]
    return Partition(indices, [sorted(np.unique(targets[i]).tolist()) for i in indices])


def shard_partition(
    targets: np.ndarray,
    num_clients: int,
    num_classes: int,
    rng: np.random.Generator,
    shards_per_client: int = 2,
) -> Partition:
    """Balanced non-IID split: each client gets ``shards_per_client`` shards, one label each.

    Every class is cut into ``shards_per_client * num_clients / num_classes``
    shards; labels are dealt to clients at random, so a client holds at most
    ``shards_per_client`` classes (fewer when it draws the same label twice).
    """
    _check_clients(len(targets), num_clients)
    total_shards = shards_per_client * num_clients
    if total_shards % num_classes:
        raise ConfigError(
            f"{num_clients} clients x {shards_per_client} shards "
            f"do not divide into {num_classes} classes",
            f"choose a client count for which clients x shards is a multiple of {num_classes}",
        )
    deck = np.tile(np.arange(num_classes), total_shards // num_classes)
    dealt = rng.permutation(deck).reshape(num_clients, shards_per_client)
    labels = [sorted(set(row.tolist())) for row in dealt]
    return Partition(split_by_labels(targets, dealt.tolist(), rng).indices, labels)


def split_by_labels(
    targets: np.ndarray, client_shards: Sequence[Sequence[int]], rng: np.random.Generator
) -> Partition:
    """Give each client one shard of each label it lists, shards of a class being equal parts.

    Used for the training split and, with the same label lists, for the test
    split of a non-IID experiment.
    """
    shard_lists: dict[int, list[np.ndarray]] = {}
    for label in sorted({lab for shards in client_shards for lab in shards}):
        demand = sum(list(s).count(label) for s in client_shards)
        members = rng.permutation(np.flatnonzero(targets == label))
        if len(members) < demand:
            raise ConfigError(
                f"label {label} has {len(members)} examples for {demand} shards",
                "use fewer clients or more data",
            )
        shard_lists[label] = list(np.array_split(members, demand))
    indices = []
    for shards in client_shards:
        parts = [shard_lists[label].pop() for label in shards]
        indices.append(np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64))
    return Partition(indices, [sorted(set(s)) for s in client_shards])


@dataclass(frozen=True)
class FederatedSplit:
    """Which examples are in play and which client holds which.

    ``train.indices`` index into ``train_keep`` (the examples in play), and so
    do ``test.indices`` into ``test_keep``; ``test`` is None for IID splits.
    """

    train_keep: np.ndarray
    test_keep: np.ndarray
    train: Partition
    test: Partition | None


def _keep(count: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    if limit is None or limit >= count:
        return np.arange(count)
    if limit < 1:
        raise ConfigError(f"example limit must be at least 1, got {limit}")
    return np.sort(rng.permutation(count)[:limit])


def _test_side(seed: int) -> np.random.Generator:
    """The test side of a run draws apart from its training side."""
    return np.random.default_rng([seed, 1])


def held_out_examples(count: int, limit: int | None, seed: int) -> np.ndarray:
    """The test examples a run with ``seed`` scores when it keeps ``limit`` of ``count``.

    The same ones ``federated_split`` keeps: ``simulate --test-examples`` and the
    coordinator's ``--eval-examples`` score one subset for one seed.
    """
    return _keep(count, limit, _test_side(seed))


def train_shards(
    train_targets: np.ndarray,
    num_clients: int,
    split: Split,
    num_classes: int,
    seed: int,
    shards_per_client: int = 2,
    train_examples: int | None = None,
) -> tuple[np.ndarray, Partition]:
    """The training examples in play and each client's share of them, from the seed alone.

    A device computes its own shard with this; ``federated_split`` adds the test side.
    """
    rng = np.random.default_rng(seed)
    keep = _keep(len(train_targets), train_examples, rng)
    targets = train_targets[keep]
    if split is Split.iid:
        return keep, iid_partition(targets, num_clients, rng)
    return keep, shard_partition(targets, num_clients, num_classes, rng, shards_per_client)


def federated_split(
    train_targets: np.ndarray,
    test_targets: np.ndarray,
    num_clients: int,
    split: Split,
    num_classes: int,
    seed: int,
    shards_per_client: int = 2,
    train_examples: int | None = None,
    test_examples: int | None = None,
) -> FederatedSplit:
    """The whole data split of a run, from its seed alone (simulation and devices agree)."""
    train_keep, train = train_shards(
        train_targets, num_clients, split, num_classes, seed, shards_per_client, train_examples
    )
    rng = _test_side(seed)
    test_keep = _keep(len(test_targets), test_examples, rng)
    if split is Split.iid:
        return FederatedSplit(train_keep, test_keep, train, None)
    test = split_by_labels(test_targets[test_keep], [sorted(lab) for lab in train.labels], rng)
    return FederatedSplit(train_keep, test_keep, train, test)


def stretch_partition(
    rows: np.ndarray, num_clients: int, split: Split, seed: int, train_examples: int | None = None
) -> tuple[np.ndarray, Partition]:
    """A language model's token rows in play and each client's share of them, from the seed.

    Equal contiguous stretches of the token stream, dealt to clients at random,
    as in the official code, which cuts the training stream into one row per
    client: a client holds consecutive text (about 3,800 distinct tokens per
    client of 100 on WikiText-2; random 64-token rows would give about 5,400).
    ``train_examples`` keeps that many rows from the start of the stream. A
    client's labels are the token ids it holds. IID only, as in the paper.
    """
    if Split(split) is not Split.iid:
        raise ConfigError(
            "the language model is split IID only, as in the paper", "use --split iid"
        )
    count = len(rows) if train_examples is None else min(train_examples, len(rows))
    if not 1 <= num_clients <= count:
        raise ConfigError(
            f"{num_clients} clients for {count} rows of text",
            "every client needs at least one row: use fewer clients or more rows",
        )
    share = count // num_clients
    stretch = np.random.default_rng(seed).permutation(num_clients)
    indices = [np.arange(s * share, (s + 1) * share) for s in stretch.tolist()]
    labels = [sorted(np.unique(rows[i]).tolist()) for i in indices]
    return np.arange(count), Partition(indices, labels)
