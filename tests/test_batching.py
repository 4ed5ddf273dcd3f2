import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from heterofl_edge.batching import SplitMix64, epoch_batches, shuffled, stats_batches

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture(scope="module")
def vectors():
    return json.loads((VECTORS / "shuffle.json").read_text())


def test_splitmix64_matches_the_reference_c_implementation():
    # Vigna's splitmix64.c seeded with 1234567 (values printed by the C reference).
    rng = SplitMix64(1234567)
    assert [rng.next64() for _ in range(3)] == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
    ]
    assert SplitMix64(0).next64() == 0xE220A8397B1DCDAF


def test_generator_matches_the_shared_vectors(vectors):
    for case in vectors["splitmix64"]:
        rng = SplitMix64(case["seed"])
        assert [str(rng.next64()) for _ in case["next64"]] == case["next64"]
    for case in vectors["below"]:
        rng = SplitMix64(case["seed"])
        assert [rng.below(b) for b in case["bounds"]] == case["values"]
        assert str(rng.state) == case["state_after"]


def test_epoch_batches_match_the_shared_vectors(vectors):
    for case in vectors["epoch_batches"]:
        batches = epoch_batches(
            case["num_examples"], case["epochs"], case["batch_size"], case["seed"]
        )
        assert [b.tolist() for b in batches] == case["batches"]


def test_each_epoch_is_a_fresh_permutation_and_the_last_batch_is_short():
    batches = list(epoch_batches(10, 3, 4, seed=5))
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    epochs = [np.concatenate(batches[i : i + 3]) for i in (0, 3, 6)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(10))
        assert order.dtype == np.int64
    assert len({tuple(o.tolist()) for o in epochs}) == 3


def test_draws_are_unbiased_on_a_small_range():
    rng = SplitMix64(3)
    counts = Counter(tuple(shuffled(3, rng)) for _ in range(6000))
    assert len(counts) == 6
    assert all(850 < c < 1150 for c in counts.values())  # 1000 +- 5 sigma
    bound = 3 * 2**30
    upper = sum(rng.below(bound) >= bound // 2 for _ in range(2000))
    assert 890 < upper < 1110  # half of them, +- 5 sigma


def test_seeds_and_bounds_outside_the_specified_ranges_are_refused():
    with pytest.raises(ValueError):
        SplitMix64(2**32)
    with pytest.raises(ValueError):
        SplitMix64(-1)
    with pytest.raises(ValueError):
        SplitMix64(0).below(0)
    with pytest.raises(ValueError):
        list(epoch_batches(10, 1, 0, seed=0))


def test_statistics_batches_are_consecutive():
    assert list(stats_batches(1201)) == [slice(0, 500), slice(500, 1000), slice(1000, 1201)]
