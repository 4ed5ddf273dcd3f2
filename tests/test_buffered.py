"""Buffered asynchronous aggregation (FedBuff) with HeteroFL's widths: the math and the engine.

* staleness weights as FedBuff defines them, and bad rules refused in one line;
* a buffer of two widths and two staleness levels, worked by hand;
* K = every client, no staleness, eta = 1: the synchronous average (aggregator)
  and the synchronous run (the engine, in simulation), to float rounding;
* simulated time: stragglers miss a synchronous deadline, a device too slow even
  for buffered mode is refused as stale and re-leveled, and a time-modelled run
  is the same bits for any number of workers.
"""

from __future__ import annotations

import math

import pytest
import torch

from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.buffered import (
    Aggregation,
    BufferedAggregator,
    StalenessKind,
    StalenessRule,
    parse_staleness,
)
from heterofl_edge.buffered_engine import Arrival, MemoryBufferedJournal
from heterofl_edge.engine import Client, StatisticsClients, TrainReply
from heterofl_edge.errors import ConfigError
from heterofl_edge.federation import Quorum, build_engine
from heterofl_edge.models import get_architecture
from heterofl_edge.profile_policy import LevelTable, ProfileLevels, level_costs
from heterofl_edge.simulated_time import (
    Availability,
    OnOff,
    SimulatedFleet,
    parse_availability,
    parse_tiers,
)
from heterofl_edge.simulation import Execution, SimulationConfig, run_simulation
from heterofl_edge.slicing import Dim, Submodel, TensorRule, extract_submodel_state
from heterofl_edge.spec import FederationSpec, Policy, spec_values
from heterofl_edge.training import LocalTrainingConfig

CONSTANT = StalenessRule(StalenessKind.constant, 0.0, 0.0)

# A 2-layer toy (as tests/test_aggregation.py): hidden width 16 (b keeps 8), 3 classes.
SPEC = {
    "hidden.weight": TensorRule((Dim.width(16), Dim.fixed(2))),
    "hidden.bias": TensorRule((Dim.width(16),)),
    "out.weight": TensorRule((Dim.labels(3), Dim.width(16))),
    "out.bias": TensorRule((Dim.labels(3),)),
    "stat": TensorRule((Dim.width(16),), trainable=False),
}


def state_of(value: float) -> dict[str, torch.Tensor]:
    return {
        "hidden.weight": torch.full((16, 2), value),
        "hidden.bias": torch.full((16,), value),
        "out.weight": torch.full((3, 16), value),
        "out.bias": torch.full((3,), value),
        "stat": torch.full((16,), 7.0),
    }


def trained(width: int, value: float) -> dict[str, torch.Tensor]:
    return {
        "hidden.weight": torch.full((width, 2), value),
        "hidden.bias": torch.full((width,), value),
        "out.weight": torch.full((3, width), value),
        "out.bias": torch.full((3,), value),
    }


def test_staleness_weights_are_fedbuffs_forms():
    assert [CONSTANT.weight(t) for t in (0, 5, 50)] == [1.0, 1.0, 1.0]
    polynomial = parse_staleness("polynomial:0.5")
    assert [polynomial.weight(t) for t in (0, 3, 8)] == [1.0, 0.5, 1 / 3]
    hinge = parse_staleness("hinge:2,1")  # 1 up to 1 version, then 1 / (2 (tau - 1) + 1)
    assert [hinge.weight(t) for t in (0, 1, 2, 3)] == [1.0, 1.0, 1 / 3, 0.2]
    assert parse_staleness("constant") == CONSTANT
    for text in ("constant", "polynomial:0.5", "hinge:10,4", "polynomial:1e-3"):
        rule = parse_staleness(text)
        assert parse_staleness(str(rule)) == rule
    assert StalenessRule() == polynomial  # the default: FedBuff's 1/sqrt(1 + tau)


@pytest.mark.parametrize(
    "text", ["polynomial", "polynomial:-1", "hinge:1", "linear:2", "polynomial:nan", ""]
)
def test_a_staleness_rule_of_no_fedbuff_form_is_one_clear_error(text):
    with pytest.raises(ConfigError) as refused:
        FederationSpec(**spec_values({"staleness": text}))
    assert "\n" not in refused.value.message and refused.value.hint
    assert "polynomial:a" in refused.value.hint or "unknown staleness" in refused.value.message


def test_a_buffer_of_two_widths_and_two_staleness_levels_worked_by_hand():
    # Prepare: the current model (version 2) is all 0; the update of client A (rate 1, all
    # labels, from version 2: tau 0, weight 1) is 4 - 0 = 4 everywhere; client B (rate 1/2,
    # labels {0, 1}, from version 0 whose weights were -2: tau 2, polynomial:1 weight 1/3)
    # trained to 1, an update of 1 - (-2) = 3 on its slice. Server lr 0.5.
    buffer = BufferedAggregator(state_of(0.0), SPEC, 1.0, server_lr=0.5)
    rule = parse_staleness("polynomial:1")
    buffer.add(trained(16, 4.0), state_of(0.0), 1.0, rule.weight(0), labels=[0, 1, 2])
    buffer.add(trained(8, 1.0), state_of(-2.0), 0.5, rule.weight(2), labels=[0, 1])

    # Execute
    new = buffer.finalize()

    # Assert: units 0..7 (both hold them): sum 1 x 4 + 1/3 x 3 = 5 over the count of updates
    # 2, i.e. 2.5, times 0.5: 1.25. Units 8..15 (A alone): 0.5 x 1 x 4 = 2.
    hidden = torch.tensor([1.25] * 8 + [2.0] * 8)
    assert torch.equal(new["hidden.bias"], hidden)
    assert torch.equal(new["hidden.weight"], hidden[:, None].expand(16, 2))
    # Classifier: rows 0, 1 as the hidden units; row 2 (B lacks label 2) from A alone.
    assert torch.equal(new["out.weight"], torch.stack([hidden, hidden, torch.full((16,), 2.0)]))
    assert torch.equal(new["out.bias"], torch.tensor([1.25, 1.25, 2.0]))
    assert torch.equal(new["stat"], torch.full((16,), 7.0))  # not trained: untouched
    assert buffer.weights == [1.0, 1 / 3]


def test_a_stale_update_alone_on_its_elements_moves_them_by_its_weight():
    # B (rate 1/2, all labels, 3 versions stale: polynomial:1 weight 1/4) and C (rate 1/2,
    # fresh) hold units 0..7; A (rate 1, 3 versions stale) is alone on units 8..15. The
    # current model is 0 and so was every base; each trained to 8.
    rule = parse_staleness("polynomial:1")
    buffer = BufferedAggregator(state_of(0.0), SPEC, 1.0)
    buffer.add(trained(16, 8.0), state_of(0.0), 1.0, rule.weight(3))
    buffer.add(trained(8, 8.0), state_of(0.0), 0.5, rule.weight(3))
    buffer.add(trained(8, 8.0), state_of(0.0), 0.5, rule.weight(0))
    new = buffer.finalize()
    # Units 0..7: (1/4 x 8 + 1/4 x 8 + 1 x 8) / 3 = 4; units 8..15: 1/4 x 8 / 1 = 2, where a
    # division by the summed weights would give 8 there: A's whole update.
    assert torch.equal(new["hidden.bias"], torch.tensor([4.0] * 8 + [2.0] * 8))


def test_a_rolling_window_counts_the_indices_the_client_held():
    # FedRolex at offset 12: a rate-1/2 client holds units 12..15 and 0..3 (wrapped).
    buffer = BufferedAggregator(state_of(1.0), SPEC, 1.0)
    buffer.add(trained(8, 3.0), state_of(1.0), 0.5, labels=None, offset=12)
    new = buffer.finalize()
    assert torch.equal(new["hidden.bias"], torch.tensor([3.0] * 4 + [1.0] * 8 + [3.0] * 4))


@pytest.mark.parametrize("offset", [0, 5])
def test_k_every_client_without_staleness_is_the_synchronous_average(offset):
    """Within one float32 rounding step of each element (measured: equal here)."""
    arch = get_architecture("conv")
    torch.manual_seed(0)
    current = {k: v.clone() for k, v in arch.build(1.0).state_dict().items()}
    sync = HeteroFLAggregator(current, arch.spec, 1.0)
    buffered = BufferedAggregator(current, arch.spec, 1.0, server_lr=1.0)
    for rate, labels in ((1.0, range(10)), (0.25, range(10)), (0.0625, [3, 7])):
        start = extract_submodel_state(current, arch.spec, rate, 1.0, offset)
        update = {
            n: start[n] + 0.05 * torch.randn_like(start[n])
            for n in arch.spec
            if arch.spec[n].trainable
        }
        sync.add(update, rate, labels, offset)
        buffered.add(update, current, rate, CONSTANT.weight(0), labels, offset)
    a, b = sync.finalize(), buffered.finalize()
    eps = torch.finfo(torch.float32).eps
    for name in a:
        assert torch.all((a[name] - b[name]).abs() <= eps * a[name].abs()), name


def tiny(**overrides):
    settings = dict(
        mode="c1-e1",
        rounds=2,
        num_clients=4,
        fraction=1.0,
        lr=0.01,
        seed=3,
        train_examples=200,
        test_examples=200,
        local=LocalTrainingConfig(epochs=1, batch_size=10),
        statistics=StatisticsClients.all,
    )
    settings.update(overrides)
    return SimulationConfig(**settings)


@pytest.mark.parametrize("submodel", [Submodel.static, Submodel.rolling])
def test_buffered_with_k_every_client_and_no_staleness_is_the_synchronous_run(mnist, submodel):
    """The engine: 2 versions of 4 updates (levels c and e) equal 2 synchronous rounds."""
    synchronous = run_simulation(tiny(submodel=submodel), mnist, execution=Execution(workers=1))
    buffered = run_simulation(
        tiny(
            submodel=submodel,
            aggregation=Aggregation.buffered,
            buffer_size=4,
            staleness=CONSTANT,
            server_lr=1.0,
        ),
        mnist,
        execution=Execution(workers=1),
    )
    assert [r.buffer["staleness"] for r in buffered.rounds] == [[0] * 4, [0] * 4]
    worst = max(
        float((synchronous.global_state[n] - buffered.global_state[n]).abs().max())
        for n in synchronous.global_state
    )
    assert worst <= 1e-6  # float rounding of old + sum(trained - old) / n; measured 0
    assert [r.global_accuracy for r in synchronous.rounds] == pytest.approx(
        [r.global_accuracy for r in buffered.rounds], abs=1e-3
    )


def test_availability_is_a_seeded_on_off_process():
    process = OnOff(Availability(300.0, 100.0), seed=1, position=4)
    again = OnOff(Availability(300.0, 100.0), seed=1, position=4)
    times = [float(t) for t in range(0, 200_000, 37)]
    states = [process.online(t) for t in times]
    assert states == [again.online(t) for t in reversed(times)][::-1]  # any order of asking
    share = sum(states) / len(states)
    assert 0.7 < share < 0.8  # on / (on + off) = 0.75
    t = next(t for t, s in zip(times, states, strict=True) if s)
    end = process.online_until(t)
    assert end > t and process.online(end - 1e-6) and not process.online(end + 1e-6)
    assert parse_availability("always") is None
    assert parse_availability("3600,1200") == Availability(3600.0, 1200.0)
    assert parse_tiers("1,3@50@1024,10@10@256") == SimulatedFleet().tiers
    for bad in ("3600", "a,b", "-1,5"):
        with pytest.raises(ConfigError):
            parse_availability(bad)


def test_stragglers_miss_a_synchronous_deadline_on_the_simulated_clock(mnist):
    # Tiers 1x and 100x: at level e with 5 steps of 50 ms the fast devices take 0.25 s, the
    # slow ones 25 s; the 10 s deadline closes every round without them.
    fleet = SimulatedFleet(tiers=parse_tiers("1,100"), step_ms=50.0, round_seconds=10.0)
    result = run_simulation(
        tiny(mode="e", train_examples=200, fleet=fleet, rounds=2),
        mnist,
        execution=Execution(workers=1),
    )
    assert [r.levels for r in result.rounds] == [{"e": 2}, {"e": 2}]
    assert [r.simulated_time for r in result.rounds] == pytest.approx([10.0, 20.0], abs=1e-3)


class SlowThirdClient:
    """Clients 0 and 1 answer at once (1 s); client 2 answers only ``lag`` versions later."""

    def __init__(self, spec, lag: int) -> None:
        self.spec = spec
        self.lag = lag
        self.engine = None
        self.pending: list = []
        self.dispatched: list = []
        self.seq = 0

    def wait_for_clients(self, minimum):
        return [Client(str(i), i) for i in range(3)]

    def population(self):
        return 3

    def stopping(self):
        return False

    def all_silent(self, clients):
        return False

    def dispatch(self, tasks, state):
        for task in tasks:
            t = task.task
            start = extract_submodel_state(state, self.spec, t.rate, 1.0, t.offset)
            self.pending.append((task, start))
            self.dispatched.append((t.client, task.version, t.rate))

    def arrivals(self, after):
        while True:
            ready = [
                (task, start)
                for task, start in self.pending
                if task.client != "2" or self.engine.version >= task.version + self.lag
            ]
            task, start = ready[0]
            self.pending.remove((task, start))
            update = {n: v + 0.01 for n, v in start.items() if self.spec[n].trainable}
            seconds = 1.0 if task.client != "2" else 500.0
            self.seq += 1
            reply = TrainReply(task.client, update, None, 10, {"loss": 1.0}, seconds)
            yield Arrival(self.seq, task.version, reply)

    def published(self, version):
        return None

    def release(self, tasks):
        raise AssertionError("nobody goes silent here")

    def idle(self):
        raise AssertionError("someone can always train here")


def test_a_device_too_slow_even_for_buffered_mode_is_refused_and_releveled():
    arch = get_architecture("conv")
    spec = FederationSpec(
        mode="a-b-c-d-e",
        policy=Policy.profile,
        rounds=6,
        fraction=1.0,
        aggregation=Aggregation.buffered,
        buffer_size=2,
        max_staleness=1,
        statistics=StatisticsClients.none,
    )
    transport = SlowThirdClient(arch.spec, lag=2)  # its updates arrive 2 versions late
    rates = {str(i): 1.0 for i in range(3)}
    policy = ProfileLevels(
        level_costs(arch, spec.level_mix.rates), LevelTable(), rates.__getitem__, rates.update
    )
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in arch.build(1.0).state_dict().items()}
    engine = build_engine(
        spec,
        transport,
        MemoryBufferedJournal(),
        lambda: initial,
        lambda: 0.0,
        population=3,
        quorum=Quorum(round_seconds=60.0),
        policy=policy,
        has_statistics=False,
    )
    transport.engine = engine
    records = []
    engine.on_round = records.append
    engine.run()
    assert engine.completed == 6
    slow = [rate for client, _, rate in transport.dispatched if client == "2"]
    assert slow[:3] == [1.0, 0.5, 0.25]  # a, then one level down after each refusal
    assert rates["0"] == rates["1"] == 1.0  # the fast devices stay at a
    assert sum(r.buffer["refused_stale"] for r in records) >= 2
    assert all(s <= 1 for r in records for s in r.buffer["staleness"])


@pytest.mark.slow
def test_a_time_modelled_buffered_run_is_the_same_for_any_number_of_workers(mnist):
    fleet = SimulatedFleet(availability=Availability(60.0, 30.0), step_ms=20.0)
    config = tiny(
        mode="c-e",
        num_clients=8,
        fraction=0.5,
        rounds=3,
        train_examples=400,
        fleet=fleet,
        aggregation=Aggregation.buffered,
        buffer_size=3,
        statistics=StatisticsClients.round,
    )
    one = run_simulation(config, mnist, execution=Execution(workers=1))
    two = run_simulation(config, mnist, execution=Execution(workers=2))
    assert [r.simulated_time for r in one.rounds] == [r.simulated_time for r in two.rounds]
    assert [r.buffer for r in one.rounds] == [r.buffer for r in two.rounds]
    assert all(math.isfinite(r.simulated_time) for r in one.rounds)
    for name, tensor in one.global_state.items():
        assert torch.equal(tensor, two.global_state[name]), name
