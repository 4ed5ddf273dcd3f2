"""Splitting a labelled data set across clients: IID and balanced non-IID shards."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from heterofl_edge.errors import ConfigError

__all__ = ["Partition", "iid_partition", "shard_partition", "split_by_labels"]


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
