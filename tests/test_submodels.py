"""Rolling sub-models (FedRolex) against a direct implementation written here from the paper."""

import math

import numpy as np
import pytest
import torch

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.assignment import parse_mode
from heterofl_edge.engine import Client, EngineSettings, Phase, RoundEngine, TrainReply
from heterofl_edge.models.conv import conv_spec
from heterofl_edge.slicing import Submodel, extract_submodel_state, shapes_at, window
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule

HIDDEN = (4, 6, 8, 10)
CLASSES = 5


# -- the reference: index lists and numpy, nothing from heterofl_edge.slicing ------------
def kept(total: int, size: int, offset: int) -> list[int]:
    """FedRolex: ``size`` indices from ``offset`` on, cyclic, listed in increasing order."""
    return sorted({(offset + k) % total for k in range(size)})


def reference_indices(rate: float, offset: int) -> dict[str, list[list[int]]]:
    """For every tensor of the conv spec, the global indices a sub-model holds, per dimension."""
    out: dict[str, list[list[int]]] = {}
    previous = [0]
    for i, h in enumerate(HIDDEN):
        rows = kept(h, math.ceil(rate * h), offset)
        out[f"blocks.{i}.conv.weight"] = [rows, previous, [0, 1, 2], [0, 1, 2]]
        for name in (
            "conv.bias",
            "norm.weight",
            "norm.bias",
            "norm.running_mean",
            "norm.running_var",
        ):
            out[f"blocks.{i}.{name}"] = [rows]
        previous = rows
    out["classifier.weight"] = [list(range(CLASSES)), previous]
    out["classifier.bias"] = [list(range(CLASSES))]
    return out


def reference_extract(state, rate, offset):
    return {
        name: state[name].numpy()[np.ix_(*idx)]
        for name, idx in reference_indices(rate, offset).items()
    }


def reference_aggregate(state, uploads, offset):
    """Average of every element over the clients that held it (classifier rows: their labels)."""
    new = {}
    for name, tensor in state.items():
        if "running" in name:  # not trained (the reference may name tensors; the code may not)
            new[name] = tensor.numpy()
            continue
        total = np.zeros(tensor.shape)
        count = np.zeros(tensor.shape)
        for update, rate, labels in uploads:
            idx = reference_indices(rate, offset)[name]
            values = update[name].numpy().astype(np.float64)
            if name.startswith("classifier"):
                rows = sorted(labels)
                idx = [rows, *idx[1:]]
                values = values[rows]
            total[np.ix_(*idx)] += values
            count[np.ix_(*idx)] += 1
        old = tensor.numpy()
        new[name] = np.where(count > 0, total / np.maximum(count, 1), old).astype(np.float32)
    return new


# -------------------------------------------------------------------------------------
def global_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=g)
        for n, s in shapes_at(conv_spec(num_classes=CLASSES, hidden=HIDDEN), 1.0).items()
    }


def test_window_wraps_and_lists_indices_in_order():
    assert window(3, 8, 0) == slice(0, 3)
    assert window(3, 8, 5) == slice(5, 8)
    assert window(3, 8, 7).tolist() == [0, 1, 7]
    assert window(8, 8, 5) == slice(0, 8)  # the full width is never permuted
    assert window(3, 8, 11) == slice(3, 6)  # offsets wrap around the width


@pytest.mark.parametrize("offset", [0, 1, 3, 5, 9, 29])
@pytest.mark.parametrize("rate", [1.0, 0.5, 0.25])
def test_rolling_extraction_equals_the_reference(rate, offset):
    spec = conv_spec(num_classes=CLASSES, hidden=HIDDEN)
    state = global_state()
    ours = extract_submodel_state(state, spec, rate, 1.0, offset)
    expected = reference_extract(state, rate, offset)
    assert set(ours) == set(expected)
    for name, tensor in ours.items():
        assert np.array_equal(tensor.numpy(), expected[name]), name


@pytest.mark.parametrize("offset", [0, 2, 7, 13])
def test_rolling_aggregation_counts_each_element_over_the_clients_that_held_it(offset):
    spec = conv_spec(num_classes=CLASSES, hidden=HIDDEN)
    state = global_state()
    g = torch.Generator().manual_seed(offset + 1)
    clients = [(0.75, [0, 1]), (0.5, [1, 2, 3]), (0.25, [4]), (0.5, [0, 4])]
    uploads = []
    for rate, labels in clients:
        trainable = {n: s for n, s in shapes_at(spec, rate).items() if spec[n].trainable}
        uploads.append(
            ({n: torch.randn(s, generator=g) for n, s in trainable.items()}, rate, labels)
        )
    aggregator = HeteroFLAggregator(state, spec, 1.0)
    for update, rate, labels in uploads:
        aggregator.add(update, rate, labels, offset)
    ours = aggregator.finalize()
    expected = reference_aggregate(state, uploads, offset)
    for name in state:
        assert np.allclose(ours[name].numpy(), expected[name], rtol=0, atol=1e-6), name
    # Elements held by nobody keep their value; with offset 0 only the upper-left slices train.
    if offset == 0:
        assert torch.equal(
            ours["blocks.3.conv.weight"][:, 6:], state["blocks.3.conv.weight"][:, 6:]
        )


class ReferenceClients:
    """A transport whose clients extract with the reference and add their client number."""

    def __init__(self, population):
        self.population_size = population
        self.rounds = []

    def wait_for_clients(self, minimum):
        return [Client(str(i), i) for i in range(self.population_size)]

    def population(self):
        return self.population_size

    def open_phase(self, round_number, phase, tasks, state, deadline):
        assert phase is Phase.training
        self.tasks, self.state = tasks, {k: v.clone() for k, v in state.items()}

    def replies(self, round_number, phase):
        uploads = []
        self.rounds.append((self.state, uploads, self.tasks))
        for task in self.tasks:
            sub = reference_extract(self.state, task.rate, round_number - 1)
            update = {
                n: torch.from_numpy(v + task.position) for n, v in sub.items() if "running" not in n
            }
            uploads.append((update, task.rate, [0, 1, 2, 3, 4]))
            yield TrainReply(task.client, update, (0, 1, 2, 3, 4), 10)

    def all_silent(self, clients):
        return not clients

    def close_phase(self, round_number, phase):
        return []

    def stopping(self):
        return False


def test_engine_rolls_the_window_by_one_each_round_and_aggregates_where_clients_held_it():
    spec = conv_spec(num_classes=CLASSES, hidden=HIDDEN)
    strategy = HeteroFLStrategy(
        spec,
        parse_mode("a-c-e"),
        num_clients=6,
        fraction=0.5,
        schedule=MultiStepSchedule(0.1),
        seed=3,
        submodel=Submodel.rolling,
    )
    transport = ReferenceClients(6)
    engine = RoundEngine(
        strategy,
        EngineSettings(rounds=3),
        transport,
        _NoJournal(),
        global_state,
        clock=lambda: 0.0,
        has_statistics=False,
    )
    engine.run()
    assert [tasks[0].offset for _, _, tasks in transport.rounds] == [0, 1, 2]
    state = global_state()
    for number, (before, uploads, _) in enumerate(transport.rounds, start=1):
        for name in state:
            assert torch.allclose(before[name], state[name], rtol=0, atol=1e-6), (number, name)
        state = {
            k: torch.from_numpy(v)
            for k, v in reference_aggregate(before, uploads, number - 1).items()
        }
    for name in state:
        assert torch.allclose(engine.global_state[name], state[name], rtol=0, atol=1e-6), name


class _NoJournal:
    def resume(self):
        return None

    def round_opened(self, opened):
        return None

    def training_closed(self, opened, state):
        return None

    def round_finished(self, result, state):
        return None
