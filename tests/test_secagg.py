"""Secure aggregation (issue 29): the core's arithmetic, and secure rounds in the round engine.

The engine runs against ``ProtocolClients`` (tests/secagg_helpers.py): clients
that answer every SecAgg+ stage as a device does and "train" by a known update,
so the plain aggregate of any set of survivors is computable exactly.
"""

from __future__ import annotations

import logging
import math
import secrets

import numpy as np
import pytest
import torch
from scipy import stats
from secagg_helpers import ProtocolClients

from heterofl_edge.assignment import parse_mode
from heterofl_edge.batching import SplitMix64
from heterofl_edge.bn_stats import apply_statistics
from heterofl_edge.engine import EngineSettings, Phase, RoundEngine, RoundResult, StatisticsClients
from heterofl_edge.errors import ConfigError, HeteroFLError
from heterofl_edge.in_process import MemoryJournal
from heterofl_edge.journal import FileJournal
from heterofl_edge.models import get_architecture
from heterofl_edge.secagg import (
    PRIME,
    Advertisement,
    BelowThreshold,
    SecAggClient,
    SecAggRefusal,
    SecAggServer,
    Segment,
    SharedInt8,
    Stage,
    VectorLayout,
    combine_shares,
    decode_wide,
    degree_for,
    embedding,
    encode_wide,
    fixed_point_for,
    neighbour_graph,
    shared_int8_for,
    split_secret,
    training_vector,
)
from heterofl_edge.secure_aggregation import SecureSettings, sbn_layers
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.spec import FederationSpec
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule

CLIENTS = 10
# Two labels per client (the label split): the classifier's rows count only their holders.
LABELS = [[(2 * i) % 10, (2 * i + 1) % 10] for i in range(CLIENTS)]
MODE = "a2-b2-c2-d2-e2"  # levels a..e, two clients each (Fix)


def _arch():
    return get_architecture("conv")


def _initial_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in _arch().build().state_dict().items()}


def _engine(
    clients: ProtocolClients,
    rounds: int = 1,
    threshold: float = 0.5,
    results=None,
    journal=None,
    int8: bool = False,
) -> RoundEngine:
    arch = _arch()
    strategy = HeteroFLStrategy(
        arch.spec,
        parse_mode(MODE),
        num_clients=CLIENTS,
        fraction=1.0,
        schedule=MultiStepSchedule(0.1),
        seed=1,
        secure=SecureSettings(clip=1.0, threshold=threshold, int8=int8),
        num_classes=arch.num_classes,
    )
    return RoundEngine(
        strategy,
        EngineSettings(rounds=rounds),
        clients,
        journal or MemoryJournal(),
        _initial_state,
        clock=lambda: 0.0,
        on_round=None if results is None else results.append,
    )


def _clients(vanish=None, vanish_rounds=None) -> ProtocolClients:
    state = _initial_state()
    channels = dict(sbn_layers(state))
    return ProtocolClients(
        _arch().spec, 1.0, LABELS, channels, seed=7, vanish=vanish, vanish_rounds=vanish_rounds
    )


class _Recorder:
    """Captures the state before each training phase and the round's tasks."""

    def __init__(self, clients: ProtocolClients) -> None:
        self.clients = clients
        self.before: dict[int, tuple[dict, tuple]] = {}
        original = clients.open_phase

        def open_phase(round_number, phase, tasks, state, deadline, secure=None):
            if phase.value == "training":
                self.before[round_number] = ({k: v.clone() for k, v in state.items()}, tasks)
            original(round_number, phase, tasks, state, deadline, secure)

        clients.open_phase = open_phase  # type: ignore[method-assign]


# The bound: each element of the secure model differs from the plain one by at most the fixed
# point's rounding of an average (0.5 / scale: 3.7e-9 at 10 clients, clip 1) plus float32
# rounding of both results (a weight is stored as float32: 2 ulp of its magnitude).
def _bound(fixed_resolution: float, value: torch.Tensor) -> torch.Tensor:
    return fixed_resolution + 2 * torch.finfo(torch.float32).eps * value.abs().double()


def _assert_model_equal(secure: dict, plain: dict, resolution: float) -> float:
    worst = 0.0
    for name, value in plain.items():
        if "running" in name or "num_batches" in name:
            continue
        gap = (secure[name].double() - value.double()).abs()
        assert bool((gap <= _bound(resolution, value)).all()), (name, float(gap.max()))
        worst = max(worst, float(gap.max()))
    return worst


def _assert_statistics_equal(secure: dict, plain: dict) -> None:
    for name, value in plain.items():
        if "running" in name:
            torch.testing.assert_close(secure[name], value, rtol=2e-5, atol=2e-5)


# -- the secure round equals the plain one -----------------------------------------------


def test_secure_round_equals_plain_for_levels_a_to_e_with_label_split_and_sbn_statistics():
    clients = _clients()
    recorder = _Recorder(clients)
    engine = _engine(clients)
    engine.run()
    before, tasks = recorder.before[1]
    assert sorted(t.rate for t in tasks) == sorted([1.0, 0.5, 0.25, 0.125, 0.0625] * 2)
    everyone = [t.client for t in tasks]
    plain = clients.plain_state(before, tasks, everyone)
    plain = apply_statistics(plain, clients.plain_moments(everyone))
    resolution = SecureSettings().fixed_point(CLIENTS).resolution
    assert resolution == pytest.approx(0.5 / 2**27)
    worst = _assert_model_equal(engine.global_state, plain, resolution)
    assert worst < 1e-6
    _assert_statistics_equal(engine.global_state, plain)
    # the classifier rows moved only where some client held the label, by their average
    moved = (engine.global_state["classifier.weight"] - before["classifier.weight"]).abs()
    assert bool((moved.sum(dim=1) > 0).all())  # every label is held by someone
    # the statistics instance's keys are set up in the training instance's stages: four
    # exchanges with the devices besides the two uploads, not six
    training, statistics = Phase.training, Phase.statistics
    assert [(phase, stage) for _, phase, stage in clients.stage_log] == [
        (training, Stage.advertise),
        (statistics, Stage.advertise),
        (training, Stage.share),
        (statistics, Stage.share),
        (training, Stage.unmask),
        (statistics, Stage.unmask),
    ]


def test_what_the_coordinator_receives_is_uniform_mod_2_32_and_uncorrelated_with_the_update():
    clients = _clients()
    engine = _engine(clients)
    recorder = _Recorder(clients)
    engine.run()
    _, tasks = recorder.before[1]
    bins = 256
    checked = 0
    for phase in Phase:
        for client, received in clients.masked[phase].items():
            true = clients.vectors[phase][client]
            assert received.dtype == np.uint32 and received.shape == true.shape
            # the top byte and the low byte of each element: uniform over 256 values
            for values in (received >> np.uint32(24), received & np.uint32(0xFF)):
                counts = np.bincount(values.astype(np.int64), minlength=bins)
                assert stats.chisquare(counts).pvalue > 1e-6, (phase, client)
            counts = np.bincount((true >> np.uint32(24)).astype(np.int64), minlength=bins)
            assert stats.chisquare(counts).pvalue < 1e-12  # unmasked: far from uniform
            r = np.corrcoef(received.astype(np.float64), true.view(np.int32).astype(np.float64))
            assert abs(r[0, 1]) < 5 / math.sqrt(true.size), (phase, client, r[0, 1])
            checked += 1
    assert checked == 2 * CLIENTS
    # the true training vector is the client's fixed-point update, to the float32 rounding of
    # trained minus received weights (below 1: 2^-24 each, 8 units at the scale 2^27)
    fixed, plan = SecureSettings().fixed_point(CLIENTS), engine.strategy.training_plan()
    task = tasks[0]
    update = {n: u.astype(np.float64) for n, u in clients.updates[task.client].items()}
    expected = training_vector(update, plan, task.rate, fixed, LABELS[task.position])
    gap = clients.vectors[Phase.training][task.client].view(np.int32) - expected.view(np.int32)
    assert np.abs(gap.astype(np.int64)).max() <= 16


# -- int8 uploads (issue 31): the quantized integers are what is masked ------------------


def test_int8_secure_round_is_the_plain_average_of_what_each_client_quantized():
    """Masks cancel in Z_2^12 (10 clients: 8 + 4 bits); each upload is uint16."""
    clients = _clients()
    recorder = _Recorder(clients)
    engine = _engine(clients, int8=True)
    engine.run()
    before, tasks = recorder.before[1]
    int8 = SecureSettings(int8=True).quantizer(CLIENTS)
    assert isinstance(int8, SharedInt8) and int8.modulus_bits == 12
    plan = engine.strategy.training_plan()
    dequantized = {}
    for task in tasks:
        masked = clients.masked[Phase.training][task.client]
        assert masked.dtype == np.uint16 and int(masked.max()) < 2**12
        vector = clients.vectors[Phase.training][task.client]
        q = vector.view(np.int32)[: plan.layout(task.rate).tensor_size]
        assert int(q.min()) >= -127 and int(q.max()) <= 127
        # what this client quantized: received weights plus q steps, tensor by tensor
        received = extract_submodel_state(before, _arch().spec, task.rate, 1.0)
        at, trained = 0, {}
        for segment in plan.layout(task.rate).segments:
            steps = q[at : at + segment.size].reshape(segment.shape).astype(np.float64)
            update = torch.from_numpy(steps * int8.step)
            trained[segment.name] = (received[segment.name].double() + update).float()
            at += segment.size
        dequantized[task.client] = trained
    everyone = [t.client for t in tasks]
    plain = clients.plain_state(before, tasks, everyone)
    clients.trained.update(dequantized)
    exact = clients.plain_state(before, tasks, everyone)
    # the unmasked sum is exact: only the float32 rounding of the weights is left (a step
    # is 7.9e-3; a mask that did not cancel, or a sum read in the wrong modulus, is far more)
    assert _assert_model_equal(engine.global_state, exact, 1e-8) < 1e-6
    # and within one step of the unquantized average (each rounding is below one step)
    _assert_model_equal(engine.global_state, plain, int8.step)


def test_shared_int8_rounds_without_bias_and_sums_of_n_clients_do_not_wrap():
    rng = SplitMix64(11)
    quantizer = shared_int8_for(1, 0.5)
    values = np.array([0.3, -0.123, 0.0049, -0.5, 0.5, 2.0])  # the last one is clipped
    draws = np.stack([quantizer.encode(values, rng).view(np.int32) for _ in range(20000)])
    means = draws.mean(axis=0) * quantizer.step
    expected = np.clip(values, -0.5, 0.5)
    spread = quantizer.step / 2 / math.sqrt(len(draws))  # a rounding's std is at most step / 2
    assert np.all(np.abs(means - expected) <= 5 * spread), (means, expected)
    assert set(np.unique(draws[:, 4])) == {127} and set(np.unique(draws[:, 3])) == {-127}
    with pytest.raises(HeteroFLError):
        quantizer.encode(values)  # int8 draws its rounding: no rng, no encoding
    for clients in (1, 2, 10, 100, 1000, 2**24):
        int8 = shared_int8_for(clients, 1.0)
        assert int8.modulus_bits == 8 + math.ceil(math.log2(clients))
        extreme = int8.encode(np.array([5.0, -5.0]), SplitMix64(0))  # 127 and -127
        total = (extreme.astype(np.uint64) * np.uint64(clients)) % np.uint64(2**32)
        sums = total.astype(np.uint32) & np.uint32(2**int8.modulus_bits - 1)
        assert list(int8.decode_sum(sums)) == pytest.approx([clients * 1.0, -clients * 1.0])
    with pytest.raises(HeteroFLError):
        shared_int8_for(2**24 + 1, 1.0)


def test_an_int8_instance_refuses_uint32_or_out_of_range_inputs():
    server, clients, layouts = _instance(modulus_bits=12)
    requests = _through_shares(server, clients)
    request = requests["1"]
    vector = np.arange(4, dtype=np.uint32)
    masked = clients["1"].mask(vector, layouts["1"], request.peers, request.ciphertexts, 12)
    assert masked.dtype == np.uint16 and int(masked.max()) < 2**12
    for bad in (masked.astype(np.uint32), masked | np.uint16(1 << 12)):
        with pytest.raises(SecAggRefusal) as caught:
            server.accept_masked("1", bad)
        assert caught.value.code == "bad_modulus"
        assert not server.uploaded
    server.accept_masked("1", masked)


# -- dropouts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "vanished", "in_sum"),
    [
        (Stage.share, ["3"], False),  # advertised keys, never shared them
        (Stage.masked, ["3", "8"], False),  # shared keys, never uploaded: masks rebuilt
        (Stage.unmask, ["0", "5"], True),  # uploaded, gone before/while unmasking
    ],
)
def test_dropout_at_each_stage_leaves_the_survivors_exact_sum(stage, vanished, in_sum):
    clients = _clients(vanish={c: stage for c in vanished})
    recorder = _Recorder(clients)
    results: list[RoundResult] = []
    engine = _engine(clients, results=results)
    engine.run()
    assert results[0].state == "finished", results[0].reason
    before, tasks = recorder.before[1]
    if stage is Stage.share:
        assert {t.client for t in tasks} == {str(i) for i in range(CLIENTS)} - set(vanished)
    summed = [t.client for t in tasks if in_sum or t.client not in vanished]
    assert results[0].uploads == len(summed)
    plain = clients.plain_state(before, tasks, summed)
    reporters = [c for c in summed if c not in vanished]
    plain = apply_statistics(plain, clients.plain_moments(reporters))
    resolution = SecureSettings().fixed_point(CLIENTS).resolution
    _assert_model_equal(engine.global_state, plain, resolution)
    _assert_statistics_equal(engine.global_state, plain)
    assert results[0].statistics_reports == len(reporters)


@pytest.mark.parametrize("stage", [Stage.masked, Stage.unmask])
def test_below_threshold_the_round_is_abandoned_with_a_log_line_and_the_next_one_runs(
    stage, caplog
):
    vanished = [str(i) for i in range(6)]  # 4 of 10 left; the threshold is 5 of 9 neighbours
    clients = _clients(vanish={c: stage for c in vanished}, vanish_rounds={1})
    recorder = _Recorder(clients)
    results: list[RoundResult] = []
    engine = _engine(clients, rounds=2, results=results)
    initial = _initial_state()
    with caplog.at_level(logging.WARNING, logger="heterofl_edge.engine"):
        engine.run()
    first, second = results
    assert first.state == "failed"
    assert first.reason is not None and "secure aggregation abandoned" in first.reason
    assert "fewer than the" in first.reason
    lines = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert lines and lines[0].startswith("round 1: secure aggregation abandoned")
    # round 1 changed nothing; round 2 ran with everyone and equals the plain round
    before, tasks = recorder.before[2]
    for name, value in initial.items():
        assert torch.equal(before[name], value), name
    assert second.state == "finished" and second.uploads == CLIENTS
    everyone = [t.client for t in tasks]
    plain = apply_statistics(
        clients.plain_state(before, tasks, everyone), clients.plain_moments(everyone)
    )
    _assert_model_equal(engine.global_state, plain, SecureSettings().fixed_point(10).resolution)


# -- the server refuses bad input with a code, and folds nothing ----------------------------


def _layouts(sizes):
    return [VectorLayout((Segment("w", (n,), (1,)),)) for n in sizes]


def _instance(sizes=(6, 4, 4, 2), fraction=0.5, modulus_bits=32):
    layouts = _layouts(sizes)
    names = [str(i) for i in range(len(sizes))]
    server = SecAggServer(
        "ctx",
        list(zip(names, layouts, strict=True)),
        layouts[0],
        fraction,
        5,
        modulus_bits=modulus_bits,
    )
    clients = {n: SecAggClient("ctx", server.index[n]) for n in names}
    return server, clients, dict(zip(names, layouts, strict=True))


def _through_shares(server, clients):
    for name, client in clients.items():
        server.accept_advertisement(name, client.advertise())
    requests = server.close_advertisement()
    for name, request in requests.items():
        server.accept_shares(name, clients[name].share_keys(request.neighbours, request.threshold))
    return server.close_shares()


def test_a_replayed_key_advertisement_is_refused_and_not_kept():
    server, clients, _ = _instance()
    server.accept_advertisement("0", clients["0"].advertise())
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_advertisement("0", clients["0"].advertise())
    assert caught.value.code == "duplicate_advertisement"
    replay = clients["0"].advertise()  # another client sends client 0's keys
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_advertisement("1", replay)
    assert caught.value.code == "replayed_key"
    assert sorted(server.keys) == [1]
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_advertisement("1", Advertisement(b"\x04" + bytes(64), replay.s_public))
    assert caught.value.code == "bad_key"
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_advertisement("nobody", clients["1"].advertise())
    assert caught.value.code == "not_a_participant"


def test_a_share_for_an_unknown_peer_is_refused_and_not_kept():
    server, clients, _ = _instance(sizes=(6, 4, 4, 2, 2, 2, 2, 2))  # 8: degree 7, everyone
    for name, client in clients.items():
        server.accept_advertisement(name, client.advertise())
    requests = server.close_advertisement()
    shares = clients["0"].share_keys(requests["0"].neighbours, requests["0"].threshold)
    forged = dict(shares)
    forged[99] = next(iter(shares.values()))
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_shares("0", forged)
    assert caught.value.code == "unknown_peer"
    assert 1 not in server.shares
    short = dict(list(shares.items())[1:])
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_shares("0", short)
    assert caught.value.code == "bad_share"
    server.accept_shares("0", shares)
    assert 1 in server.shares


def test_a_masked_input_of_the_wrong_length_or_modulus_is_refused_and_nothing_folded():
    server, clients, layouts = _instance()
    requests = _through_shares(server, clients)
    request = requests["1"]
    masked = clients["1"].mask(
        np.arange(4, dtype=np.uint32), layouts["1"], request.peers, request.ciphertexts
    )
    empty = server._sum.copy()
    for bad, code in [
        (masked[:3], "wrong_length"),
        (np.concatenate([masked, masked[:1]]), "wrong_length"),
        (masked.astype(np.uint64) + np.uint64(2**32), "bad_modulus"),
        (masked.astype(np.int64), "bad_modulus"),
        (masked.astype(np.float32), "bad_modulus"),
    ]:
        with pytest.raises(SecAggRefusal) as caught:
            server.accept_masked("1", bad)
        assert caught.value.code == code
        assert np.array_equal(server._sum, empty) and not server.uploaded
    server.accept_masked("1", masked)
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_masked("1", masked)
    assert caught.value.code == "duplicate_upload"


def test_a_second_unmasking_reply_is_refused_and_the_sum_is_exact():
    server, clients, layouts = _instance()
    requests = _through_shares(server, clients)
    rng = np.random.default_rng(3)
    vectors = {n: rng.integers(0, 2**32, layouts[n].size, dtype=np.uint32) for n in clients}
    for name, request in requests.items():
        server.accept_masked(
            name,
            clients[name].mask(vectors[name], layouts[name], request.peers, request.ciphertexts),
        )
    plans = server.close_masked()
    answers = {n: clients[n].unmask(p.dropped, p.survivors) for n, p in plans.items()}
    server.accept_unmask("2", answers["2"])
    kept = dict(server.revealed)
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_unmask("2", answers["2"])
    assert caught.value.code == "duplicate_unmask"
    with pytest.raises(SecAggRefusal) as caught:  # the device refuses to answer twice too
        clients["2"].unmask(plans["2"].dropped, plans["2"].survivors)
    assert caught.value.code == "duplicate_unmask"
    wrong = dict(answers["3"])
    wrong[42] = 1
    with pytest.raises(SecAggRefusal) as caught:
        server.accept_unmask("3", wrong)
    assert caught.value.code == "unknown_peer"
    assert server.revealed == kept
    for name in ("0", "1", "3"):
        server.accept_unmask(name, answers[name])
    expected = np.zeros(6, np.uint32)
    for vector in vectors.values():
        expected[: vector.size] += vector
    assert np.array_equal(server.finalize(), expected)


def test_a_client_that_drops_after_sharing_has_its_masks_rebuilt_exactly():
    server, clients, layouts = _instance(sizes=(6, 4, 4, 2, 2, 6))
    requests = _through_shares(server, clients)
    vectors = {n: np.full(layouts[n].size, int(n) + 1, np.uint32) for n in clients}
    for name, request in requests.items():
        if name in ("1", "5"):  # masked, never uploaded
            continue
        server.accept_masked(
            name,
            clients[name].mask(vectors[name], layouts[name], request.peers, request.ciphertexts),
        )
    plans = server.close_masked()
    for name, plan in plans.items():
        server.accept_unmask(name, clients[name].unmask(plan.dropped, plan.survivors))
    expected = np.zeros(6, np.uint32)
    for name in ("0", "2", "3", "4"):
        expected[: vectors[name].size] += vectors[name]
    assert np.array_equal(server.finalize(), expected)


def test_below_threshold_at_the_masked_stage_asks_nothing_more():
    server, clients, layouts = _instance()
    requests = _through_shares(server, clients)
    request = requests["0"]
    server.accept_masked(
        "0",
        clients["0"].mask(np.zeros(6, np.uint32), layouts["0"], request.peers, request.ciphertexts),
    )
    with pytest.raises(BelowThreshold) as caught:
        server.close_masked()
    assert "fewer than" in caught.value.message
    assert server.stage is Stage.masked and not server.plan


# -- the arithmetic ----------------------------------------------------------------------


def test_shamir_shares_rebuild_the_secret_from_any_threshold_of_them_and_not_fewer():
    secret = secrets.randbelow(PRIME)
    shares = split_secret(secret, [1, 2, 3, 4, 5, 9], 4, secrets.token_bytes)
    assert combine_shares({x: shares[x] for x in (1, 3, 5, 9)}) == secret
    assert combine_shares({x: shares[x] for x in (2, 3, 4, 5, 9)}) == secret
    assert combine_shares({x: shares[x] for x in (1, 2, 3)}) != secret


def test_fixed_point_sums_of_n_clipped_values_do_not_wrap():
    for clients in (1, 10, 100, 1000):
        fixed = fixed_point_for(clients, 2.0)
        worst = np.full(clients, 5.0)  # clipped to 2
        total = np.zeros(1, np.uint32)
        for value in worst:
            total += fixed.encode(np.array([value]))
        assert fixed.decode_sum(total)[0] == pytest.approx(2.0 * clients)
        assert fixed.decode_sum(-total)[0] == pytest.approx(-2.0 * clients)
        assert fixed.scale * 2 * clients * 2.0 >= 2**31 - 1  # the finest such power of two


def test_wide_encoding_sums_int64_values_exactly():
    rng = np.random.default_rng(0)
    values = rng.normal(0, 1e6, (50, 7))
    total = np.zeros(7 * 4, np.uint32)
    for row in values:
        total += encode_wide(row, 2.0**16)
    expected = np.rint(values * 2.0**16).sum(axis=0) / 2.0**16
    np.testing.assert_allclose(decode_wide(total, 2.0**16), expected, rtol=0, atol=1e-9)


def test_embeddings_of_nested_slices_compose_and_follow_the_row_major_upper_left_order():
    def layout(rows, cols, heads=1):
        return VectorLayout((Segment("w", (rows, cols), (heads, 1)),), presence=0)

    small, mid, large = layout(2, 2), layout(4, 3), layout(8, 6)
    assert embedding(small, mid).tolist() == [0, 1, 3, 4]
    assert np.array_equal(embedding(small, large), embedding(mid, large)[embedding(small, mid)])
    per_head = embedding(layout(2, 1, heads=2), layout(4, 1, heads=2))
    assert per_head.tolist() == [0, 2]  # each head's first rows


def test_the_neighbour_graph_is_symmetric_and_of_logarithmic_degree():
    for n in (10, 50, 100, 1000):
        k = degree_for(n)
        graph = neighbour_graph(list(range(1, n + 1)), k, seed=n)
        assert all(i not in graph[i] for i in graph)
        assert all(i in graph[j] for i in graph for j in graph[i])
        assert {len(v) for v in graph.values()} == {min(k, n - 1)}
    assert degree_for(100) == 20 and degree_for(1000) == 30


def test_the_spec_refuses_what_secure_aggregation_cannot_do():
    with pytest.raises(ConfigError, match="static"):
        FederationSpec(secure_aggregation=True, submodel="rolling")
    with pytest.raises(ConfigError, match="differential privacy"):
        FederationSpec(secure_aggregation=True, dp_clip=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="threshold"):
        FederationSpec(secure_aggregation=True, secure_aggregation_threshold=1.5)
    assert FederationSpec(secure_aggregation=True).secure_settings == SecureSettings()


# -- a restart mid-round -------------------------------------------------------------------


class _StopsAt(ProtocolClients):
    """Protocol clients whose run stops when the engine opens ``stage`` of ``phase``."""

    def __init__(self, phase: Phase, stage: Stage) -> None:
        state = _initial_state()
        super().__init__(_arch().spec, 1.0, LABELS, dict(sbn_layers(state)), seed=7)
        self.stop_at = (phase, stage)
        self.stopped = False

    def open_stage(self, round_number, phase, stage, requests, deadline) -> None:
        super().open_stage(round_number, phase, stage, requests, deadline)
        self.stopped = self.stopped or (phase, stage) == self.stop_at

    def stopping(self) -> bool:
        return self.stopped


def _journal_engine(clients, folder, resume: bool, results) -> RoundEngine:
    journal = FileJournal(folder, {"test": "secagg"}, resume)
    if not journal.started:
        journal.start(_initial_state(), {})
    return _engine(clients, rounds=2, results=results, journal=journal)


@pytest.mark.parametrize(
    ("phase", "expect"),
    [
        (Phase.training, "abandoned: the run restarted during secure aggregation"),
        (Phase.statistics, "sBN statistics skipped: the run restarted"),
    ],
)
def test_a_restart_mid_round_abandons_what_was_masked_and_unmasks_nothing(
    tmp_path, phase, expect, caplog
):
    first = _StopsAt(phase, Stage.unmask)  # masked inputs are in, no share was revealed
    _journal_engine(first, tmp_path, False, []).run()
    assert first.stopped and first.masked[phase]  # it stopped with masked uploads held
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert all(n == "journal.json" or n.endswith(".safetensors") for n in saved), saved
    results: list[RoundResult] = []
    clients = _clients()
    recorder = _Recorder(clients)
    with caplog.at_level(logging.WARNING, logger="heterofl_edge.engine"):
        engine = _journal_engine(clients, tmp_path, True, results)
        engine.run()
    assert any(expect in r.getMessage() for r in caplog.records)
    if phase is Phase.training:
        assert [r.state for r in results] == ["failed", "finished"]
        assert results[0].round == 1 and results[0].reason is not None
        assert expect in results[0].reason
        before, _ = recorder.before[2]
        for name, value in _initial_state().items():  # round 1 changed nothing
            assert torch.equal(before[name], value), name
    else:  # training was aggregated before the stop: round 1 finishes on its old statistics
        assert [r.state for r in results] == ["finished", "finished"]
        assert results[0].statistics_reports == 0 and expect in (results[0].reason or "")
        assert 1 not in recorder.before  # round 1's training was not run again
    before, tasks = recorder.before[2]
    everyone = [t.client for t in tasks]
    plain = apply_statistics(
        clients.plain_state(before, tasks, everyone), clients.plain_moments(everyone)
    )
    _assert_model_equal(engine.global_state, plain, SecureSettings().fixed_point(10).resolution)


# -- simulate ------------------------------------------------------------------------------


@pytest.mark.slow
def test_simulate_with_secure_aggregation_trains_the_same_model_as_without(mnist, monkeypatch):
    from heterofl_edge.simulation import SimulationConfig, Split, run_simulation
    from heterofl_edge.training import LocalTrainingConfig

    unmasked: list[int] = []  # the sizes of the sums the aggregator unmasked
    finalize = SecAggServer.finalize

    def counted(self):
        sums = finalize(self)
        unmasked.append(sums.size)
        return sums

    monkeypatch.setattr(SecAggServer, "finalize", counted)

    settings = dict(
        mode="a1-c1-e1",
        split=Split.non_iid,  # two labels per client: the label split
        rounds=1,
        num_clients=10,
        fraction=0.4,
        local=LocalTrainingConfig(epochs=1),
        train_examples=2000,
        test_examples=500,
        statistics=StatisticsClients.round,
        seed=7,
    )
    plain = run_simulation(SimulationConfig(**settings), mnist)
    assert not unmasked
    secure = run_simulation(SimulationConfig(**settings, secure_aggregation=True), mnist)
    # round 0's sBN statistics, round 1's training sums and its sBN statistics
    assert len(unmasked) == 3 and unmasked[0] == unmasked[2] < unmasked[1]
    assert secure.rounds[0].levels == plain.rounds[0].levels
    resolution = SecureSettings().fixed_point(4).resolution
    _assert_model_equal(secure.global_state, plain.global_state, resolution)
    _assert_statistics_equal(secure.global_state, plain.global_state)
    assert secure.rounds[0].global_accuracy == pytest.approx(
        plain.rounds[0].global_accuracy, abs=0.01
    )


def test_secure_aggregation_takes_int8_for_every_level_and_compressed_downloads_only():
    for upload in ("fp32,e=int8", "fp16", "bf16"):  # one ring for every device of a round
        with pytest.raises(ConfigError, match="upload-encoding") as caught:
            FederationSpec(secure_aggregation=True, upload_encoding=upload)
        assert caught.value.code == "bad_config"
    with pytest.raises(ConfigError, match="error-feedback"):
        FederationSpec(secure_aggregation=True, upload_encoding="int8", error_feedback=True)
    spec = FederationSpec(secure_aggregation=True, download_encoding="fp16")
    assert spec.secure_settings == SecureSettings()
    spec = FederationSpec(secure_aggregation=True, upload_encoding="int8")
    assert spec.secure_settings == SecureSettings(int8=True)
