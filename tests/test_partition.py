import numpy as np
import pytest

from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import iid_partition, shard_partition, split_by_labels

TARGETS = np.repeat(np.arange(10), 100)  # 1,000 examples, 100 per class


def test_iid_gives_equal_disjoint_shares():
    part = iid_partition(TARGETS, 10, np.random.default_rng(0))
    sizes = {len(i) for i in part.indices}
    assert sizes == {100}
    joined = np.concatenate(part.indices)
    assert len(np.unique(joined)) == len(joined) == 1000
    assert all(
        labels == sorted(set(TARGETS[i].tolist()))
        for labels, i in zip(part.labels, part.indices, strict=False)
    )


def test_non_iid_shards_hold_at_most_two_classes_and_balanced_sizes():
    part = shard_partition(TARGETS, 20, 10, np.random.default_rng(0), shards_per_client=2)
    joined = np.concatenate(part.indices)
    assert len(np.unique(joined)) == len(joined) == 1000  # every example exactly once
    for labels, idx in zip(part.labels, part.indices, strict=False):
        present = set(TARGETS[idx].tolist())
        assert present == set(labels) and 1 <= len(present) <= 2
        assert len(idx) == 50  # 40 shards over 10 classes: two shards of 25 each
    classes_seen = {lab for labels in part.labels for lab in labels}
    assert classes_seen == set(range(10))


def test_non_iid_test_split_follows_the_training_labels():
    rng = np.random.default_rng(1)
    train = shard_partition(TARGETS, 20, 10, rng)
    test_targets = np.repeat(np.arange(10), 20)
    test = split_by_labels(test_targets, [sorted(lab) for lab in train.labels], rng)
    for labels, idx in zip(train.labels, test.indices, strict=False):
        assert set(test_targets[idx].tolist()) <= set(labels)


def test_partitions_are_reproducible_from_the_seed():
    a = shard_partition(TARGETS, 20, 10, np.random.default_rng(5))
    b = shard_partition(TARGETS, 20, 10, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=False))


def test_impossible_splits_are_refused():
    with pytest.raises(ConfigError, match="multiple of 10"):
        shard_partition(TARGETS, 7, 10, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="clients"):
        iid_partition(TARGETS[:5], 10, np.random.default_rng(0))
