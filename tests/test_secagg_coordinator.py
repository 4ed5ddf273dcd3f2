"""Secure aggregation through the coordinator's /v1 API (Flask test client, fake clock).

Devices here are ``SecAggClient``s driven over HTTP as a device drives them: they
answer the stages at /v1/rounds/N/secagg and upload masked vectors. The round's
model must equal the plain average of the known updates; bad input at each stage
is refused with its code and nothing of it is kept.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from coordinator_helpers import ARCH, PROFILE, assert_error, auth, global_model, register
from safetensors.numpy import load, save
from scipy.stats import chisquare

from coordinator.errors import ErrorCode
from heterofl_edge.batching import SplitMix64
from heterofl_edge.bn_stats import ChannelMoments, apply_statistics
from heterofl_edge.engine import Phase
from heterofl_edge.secagg import (
    Advertisement,
    FixedPoint,
    LayoutPlan,
    Quantizer,
    SecAggClient,
    SharedInt8,
    b64,
    statistics_layout,
    statistics_vector,
    training_vector,
    unb64,
)
from heterofl_edge.slicing import trainable_names

SECURE = {**PROFILE, "secure_aggregation": True}
VALUES = (1.0, 2.0, 6.0)  # devices a, c, e upload these weights everywhere
LABELS = (list(range(10)), list(range(10)), [0, 1])
MEANS = (1.0, 3.0, 0.0)  # their sBN means (count 600, variance 1)


@pytest.fixture
def secure_app(make_app):
    return make_app(secure_aggregation=True, secure_aggregation_clip=8.0)


class Devices:
    """Three devices speaking secure aggregation over the test client."""

    def __init__(self, client, tokens) -> None:
        self.client, self.tokens = client, tokens
        self.secagg: dict[tuple[str, str], SecAggClient] = {}
        self.vectors: dict[str, np.ndarray] = {}  # token -> its last vector before masking

    def task(self, token):
        return self.client.get("/v1/task", headers=auth(token)).json

    def answer(self, token, task, body=None):
        if body is None:
            body = self.body(token, task)
        return self.client.post(task["answer_url"], json=body, headers=auth(token))

    def body(self, token, task):
        key = (token, task["context"])
        if task["stage"] == "advertise":
            self.secagg[key] = SecAggClient(task["context"], task["index"])
            keys = self.secagg[key].advertise()
            return {
                "context": task["context"],
                "stage": "advertise",
                "c_public": b64(keys.c_public),
                "s_public": b64(keys.s_public),
            }
        if task["stage"] == "share":
            neighbours = {
                p["index"]: Advertisement(unb64(p["c_public"]), unb64(p["s_public"]))
                for p in task["neighbours"]
            }
            shares = self.secagg[key].share_keys(neighbours, task["threshold"])
            return {
                "context": task["context"],
                "stage": "share",
                "shares": {str(v): b64(blob) for v, blob in shares.items()},
            }
        values = self.secagg[key].unmask(task["dropped"], task["survivors"])
        return {
            "context": task["context"],
            "stage": "unmask",
            "unmask": {str(v): str(x) for v, x in values.items()},
        }

    def masked(self, token, task, vector, layout, layout_of, modulus_bits=32):
        self.vectors[token] = vector
        secure = task["secure"]
        client = self.secagg[(token, secure["context"])]
        peers = {int(v): layout_of(rate) for v, rate in secure["peers"].items()}
        ciphertexts = {int(v): unb64(blob) for v, blob in secure["ciphertexts"].items()}
        return client.mask(vector, layout, peers, ciphertexts, modulus_bits)

    def training_body(self, position, token, task):
        secure = task["secure"]
        plan = LayoutPlan.from_json(secure["plan"])
        weights = self.client.get(task["weights_url"], headers=auth(token)).data
        from safetensors.numpy import load

        start = load(weights)
        update = {
            n: VALUES[position] - start[n].astype(np.float64) for n in trainable_names(ARCH.spec)
        }
        quantizer: Quantizer
        if secure["encoding"] == "int8":
            quantizer = SharedInt8(secure["clip"], secure["modulus_bits"])
        else:
            quantizer = FixedPoint(secure["scale"], secure["clip"])
        rng = SplitMix64(task["rounding_seed"])
        vector = training_vector(update, plan, task["rate"], quantizer, LABELS[position], rng)
        layout = plan.layout(task["rate"])
        return self.masked(token, task, vector, layout, plan.layout, quantizer.modulus_bits)

    def statistics_body(self, position, token, task):
        secure = task["secure"]
        layers = [(name, channels) for name, channels in secure["layers"]]
        stats = {}
        for name, channels in layers:
            stats[f"{name}.count"] = np.array([600.0])
            stats[f"{name}.mean"] = np.full(channels, MEANS[position])
            stats[f"{name}.var"] = np.ones(channels)
        layout = statistics_layout(layers)
        vector = statistics_vector(stats, layers, secure["statistics_scale"])
        return self.masked(token, task, vector, layout, lambda rate: layout)


def _header_entry(masked, entry):
    """A safetensors body for ``masked`` whose header entry is ``entry`` (no data_offsets...)."""
    header = json.dumps({"masked": entry}).encode()
    return len(header).to_bytes(8, "little") + header + masked.tobytes()


def _stage(devices, coordinator, stage, phases=("training",)):
    """Every device answers ``stage`` of each of ``phases``' instances; the engine moves on."""
    for token in devices.tokens:
        for phase in phases:  # one after the other, in the order the stages opened
            task = devices.task(token)
            assert task["action"] == "secagg" and task["stage"] == stage, task
            assert task["phase"] == phase and task["context"].startswith("round"), task
            reply = devices.answer(token, task)
            assert reply.status_code == 200, reply.json
    assert coordinator.settle()


BOTH = ("training", "statistics")  # a round sets up both instances' keys in the same stages


def _setup(devices, coordinator):
    """Keys and shares of the round's training and statistics instances, side by side."""
    _stage(devices, coordinator, "advertise", BOTH)
    _stage(devices, coordinator, "share", BOTH)


def _instance(devices, coordinator, kind):
    """The rest of one instance: training's set-up (with statistics'), uploads, unmasking."""
    if kind == "train":
        _setup(devices, coordinator)
    _upload(devices, coordinator, kind)
    _stage(devices, coordinator, "unmask", ("training",) if kind == "train" else ("statistics",))


def _upload(devices, coordinator, kind):
    for position, token in enumerate(devices.tokens):
        task = devices.task(token)
        assert task["action"] == kind and task["secure"] is not None, task
        body = (
            devices.training_body(position, token, task)
            if kind == "train"
            else devices.statistics_body(position, token, task)
        )
        reply = devices.client.post(
            task["upload_url"], data=save({"masked": body}), headers=auth(token)
        )
        assert reply.status_code == 200, reply.json
    assert coordinator.settle()


def _expected_model(before):
    """The plain HeteroFL average of the known weights, then the plain sBN statistics."""
    from heterofl_edge.aggregation import HeteroFLAggregator
    from heterofl_edge.slicing import shapes_at

    aggregator = HeteroFLAggregator(before, ARCH.spec, 1.0)
    for value, rate, labels in zip(VALUES, (1.0, 0.25, 0.0625), LABELS, strict=True):
        shapes = shapes_at(ARCH.spec, rate)
        aggregator.add(
            {n: torch.full(shapes[n], value) for n in trainable_names(ARCH.spec)}, rate, labels
        )
    state = aggregator.finalize()
    moments = {}
    for name, channels in (("blocks.0.norm", 64), ("blocks.1.norm", 128)):
        mean = sum(MEANS) / 3
        var = sum(1 + m * m for m in MEANS) / 3 - mean * mean
        moments[name] = ChannelMoments(
            1800, torch.full((channels,), mean), torch.full((channels,), var)
        )
    return apply_statistics(state, moments)


def test_a_device_that_cannot_mask_is_refused_at_registration(secure_app):
    client = secure_app.test_client()
    reply = client.post("/v1/devices", json=PROFILE)
    assert_error(reply, 400, ErrorCode.secure_aggregation_unsupported)
    assert client.post("/v1/devices", json=SECURE).status_code == 201


def test_a_secure_round_over_the_api_gives_the_plain_average_and_statistics(secure_app):
    client = secure_app.test_client()
    coordinator = secure_app.extensions["heterofl"]
    before = global_model(client)
    devices = Devices(client, register(client, 3, SECURE))
    assert coordinator.settle()
    _setup(devices, coordinator)
    _upload(devices, coordinator, "train")
    # what the coordinator stored for each device (its database, while the round is open):
    # uniform modulo 2^32 and uncorrelated with the device's true vector
    ids = {row.device_id for row in coordinator.store.uploaded(1, Phase.training)}
    assert len(ids) == 3
    by_device = {}
    for row in coordinator.store.uploaded(1, Phase.training):
        stored = load(coordinator.store.payload(1, Phase.training, row.device_id))["masked"]
        by_device[row.device_id] = stored
    stored_vectors = sorted(by_device.values(), key=len)
    true_vectors = sorted(devices.vectors.values(), key=len)
    for stored, true in zip(stored_vectors, true_vectors, strict=True):
        assert stored.dtype == np.uint32 and stored.shape == true.shape
        if stored.size >= 4096:
            counts = np.bincount((stored >> np.uint32(24)).astype(np.int64), minlength=256)
            assert chisquare(counts).pvalue > 1e-6
        r = np.corrcoef(stored.astype(np.float64), true.view(np.int32).astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(true.size), r
    _stage(devices, coordinator, "unmask")
    # the sBN statistics' own aggregation, on the keys set up beside the training's
    _upload(devices, coordinator, "statistics")
    _stage(devices, coordinator, "unmask", ("statistics",))
    after = global_model(client)
    expected = _expected_model(before)
    resolution = FixedPoint(2.0**26, 8.0).resolution
    for name in ("blocks.0.conv.bias", "blocks.3.conv.weight", "classifier.weight"):
        gap = (after[name].double() - expected[name].double()).abs().max()
        assert gap <= resolution + 1e-6, (name, float(gap))
    torch.testing.assert_close(
        after["blocks.0.norm.running_mean"], expected["blocks.0.norm.running_mean"]
    )
    torch.testing.assert_close(
        after["blocks.1.norm.running_var"], expected["blocks.1.norm.running_var"]
    )


def test_bad_input_at_each_stage_is_refused_with_a_code_and_nothing_is_kept(secure_app):
    client = secure_app.test_client()
    coordinator = secure_app.extensions["heterofl"]
    before = global_model(client)
    devices = Devices(client, register(client, 3, SECURE))
    first, second, third = devices.tokens
    assert coordinator.settle()

    # advertise: a replayed key, a repeated advertisement, a key that is no P-256 point
    tasks = {t: devices.task(t) for t in devices.tokens}
    good = devices.body(first, tasks[first])
    assert devices.answer(first, tasks[first], good).status_code == 200
    replay = {**good, "context": tasks[second]["context"]}
    assert_error(devices.answer(second, tasks[second], replay), 409, ErrorCode.replayed_key)
    assert_error(devices.answer(first, tasks[first], good), 409, ErrorCode.duplicate_advertisement)
    bad = {**devices.body(second, tasks[second]), "c_public": b64(b"\x04" + bytes(64))}
    assert_error(devices.answer(second, tasks[second], bad), 422, ErrorCode.bad_key)
    for token in (second, third):
        assert devices.answer(token, tasks[token]).status_code == 200
    # the statistics instance's advertisement comes next: the training's keys are no keys there
    tasks = {t: devices.task(t) for t in devices.tokens}
    assert {t["phase"] for t in tasks.values()} == {"statistics"}
    reused = {**good, "context": tasks[first]["context"]}
    assert_error(devices.answer(first, tasks[first], reused), 409, ErrorCode.replayed_key)
    for token in devices.tokens:
        assert devices.answer(token, tasks[token]).status_code == 200
    assert coordinator.settle()

    # share: a share for a client that is no neighbour, then too few shares
    tasks = {t: devices.task(t) for t in devices.tokens}
    assert {t["phase"] for t in tasks.values()} == {"training"}
    good = devices.body(first, tasks[first])
    extra = {**good, "shares": {**good["shares"], "99": next(iter(good["shares"].values()))}}
    assert_error(devices.answer(first, tasks[first], extra), 422, ErrorCode.unknown_peer)
    short = {**good, "shares": dict(list(good["shares"].items())[:1])}
    assert_error(devices.answer(first, tasks[first], short), 422, ErrorCode.bad_share)
    assert devices.answer(first, tasks[first], good).status_code == 200
    for token in (second, third):
        assert devices.answer(token, tasks[token]).status_code == 200
    _stage(devices, coordinator, "share", ("statistics",))

    # masked upload: the wrong length, the wrong modulus, other tensors, twice
    task = devices.task(first)
    masked = devices.training_body(0, first, task)
    url, headers = task["upload_url"], auth(first)
    for body, status, code in (
        (save({"masked": masked[:-1]}), 422, ErrorCode.wrong_length),
        (save({"masked": masked.astype(np.int64)}), 422, ErrorCode.bad_modulus),
        (save({"masked": masked.view(np.float32)}), 422, ErrorCode.bad_modulus),
        (save({"masked": masked, "labels": np.arange(3)}), 422, ErrorCode.wrong_tensors),
        (save({"masked": masked}) + b"\0\0\0\0", 400, ErrorCode.bad_payload),  # bytes past it
        (save({"masked": masked})[:-4], 400, ErrorCode.bad_payload),  # truncated
        (_header_entry(masked, {"dtype": "U32", "shape": [-1]}), 400, ErrorCode.bad_payload),
        (
            _header_entry(masked, {"dtype": "U32", "shape": [masked.size]}),
            400,
            ErrorCode.bad_payload,
        ),
    ):
        assert_error(client.post(url, data=body, headers=headers), status, code)
    assert client.post(url, data=save({"masked": masked}), headers=headers).status_code == 200
    again = client.post(url, data=save({"masked": masked}), headers=headers)
    assert_error(again, 409, ErrorCode.duplicate_upload)
    for position, token in ((1, second), (2, third)):
        task = devices.task(token)
        body = save({"masked": devices.training_body(position, token, task)})
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    assert coordinator.settle()

    # unmask: a second reply, a share of a client that was not asked
    tasks = {t: devices.task(t) for t in devices.tokens}
    answered = devices.body(first, tasks[first])
    assert devices.answer(first, tasks[first], answered).status_code == 200
    assert_error(devices.answer(first, tasks[first], answered), 409, ErrorCode.duplicate_unmask)
    good = devices.body(second, tasks[second])
    wrong = {**good, "unmask": {**good["unmask"], "42": "1"}}
    assert_error(devices.answer(second, tasks[second], wrong), 422, ErrorCode.unknown_peer)
    assert devices.answer(second, tasks[second], good).status_code == 200
    assert devices.answer(third, tasks[third]).status_code == 200
    assert coordinator.settle()

    _instance(devices, coordinator, "statistics")
    after, expected = global_model(client), _expected_model(before)
    gap = (after["blocks.0.conv.bias"].double() - expected["blocks.0.conv.bias"].double()).abs()
    assert float(gap.max()) <= FixedPoint(2.0**26, 8.0).resolution + 1e-6


def test_a_restart_with_masked_uploads_held_fails_the_round_and_unmasks_nothing(make_app, caplog):
    first_app = make_app(secure_aggregation=True, secure_aggregation_clip=8.0)
    first = first_app.test_client()
    coordinator = first_app.extensions["heterofl"]
    before = global_model(first)
    devices = Devices(first, register(first, 3, SECURE))
    assert coordinator.settle()
    _setup(devices, coordinator)
    _upload(devices, coordinator, "train")  # the unmasking stage is open now
    task = devices.task(devices.tokens[0])
    assert task["action"] == "secagg" and task["stage"] == "unmask"
    assert devices.answer(devices.tokens[0], task).status_code == 200  # one share revealed
    coordinator.close()

    second_app = make_app(secure_aggregation=True, secure_aggregation_clip=8.0)
    second = second_app.test_client()
    restarted = second_app.extensions["heterofl"]
    assert restarted.settle()
    operator = {"Authorization": f"Bearer {restarted.config.admission.operator_token}"}
    history = second.get("/v1/rounds", headers=operator).json["rounds"]
    assert history[0]["round"] == 1 and history[0]["state"] == "failed"
    assert "restarted during secure aggregation" in history[0]["metrics"]["reason"]
    for name, value in before.items():  # nothing of round 1 reached the model
        assert torch.equal(global_model(second)[name], value), name
    # round 2 starts over with fresh keys: the devices' old instance is of no use
    again = Devices(second, devices.tokens)
    _instance(again, restarted, "train")
    _instance(again, restarted, "statistics")
    after, expected = global_model(second), _expected_model(before)
    gap = (after["blocks.0.conv.bias"].double() - expected["blocks.0.conv.bias"].double()).abs()
    assert float(gap.max()) <= FixedPoint(2.0**26, 8.0).resolution + 1e-6


def test_an_int8_secure_round_masks_uint16_integers_and_moves_within_one_step(make_app):
    """Issue 31 with issue 29: three devices' int8 sums in 8 + 2 bits, uploaded as uint16."""
    app = make_app(secure_aggregation=True, secure_aggregation_clip=8.0, upload_encoding="int8")
    client = app.test_client()
    coordinator = app.extensions["heterofl"]
    assert_error(
        client.post("/v1/devices", json=SECURE), 400, ErrorCode.secure_aggregation_unsupported
    )  # a device that declared no int8 is never sent an int8 task
    before = global_model(client)
    profile = {**SECURE, "encodings": ["fp32", "int8"]}
    devices = Devices(client, register(client, 3, profile))
    assert coordinator.settle()
    _setup(devices, coordinator)
    first = devices.tokens[0]
    task = devices.task(first)
    assert task["secure"]["encoding"] == "int8" and task["secure"]["modulus_bits"] == 10
    masked = devices.training_body(0, first, task)
    assert masked.dtype == np.uint16 and int(masked.max()) < 2**10
    url, headers = task["upload_url"], auth(first)
    for body in (
        save({"masked": masked.astype(np.uint32)}),  # the fixed point's uint32
        save({"masked": masked | np.uint16(1 << 10)}),  # beyond the modulus
    ):
        assert_error(client.post(url, data=body, headers=headers), 422, ErrorCode.bad_modulus)
    assert client.post(url, data=save({"masked": masked}), headers=headers).status_code == 200
    for position, token in ((1, devices.tokens[1]), (2, devices.tokens[2])):
        task = devices.task(token)
        body = save({"masked": devices.training_body(position, token, task)})
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    assert coordinator.settle()
    for row in coordinator.store.uploaded(1, Phase.training):  # what is stored: uint16 < 2^10
        stored = load(coordinator.store.payload(1, Phase.training, row.device_id))["masked"]
        assert stored.dtype == np.uint16 and int(stored.max()) < 2**10
        if stored.size >= 4096:
            counts = np.bincount((stored >> np.uint16(2)).astype(np.int64), minlength=256)
            assert chisquare(counts).pvalue > 1e-6
    _stage(devices, coordinator, "unmask")
    _instance(devices, coordinator, "statistics")
    after, expected = global_model(client), _expected_model(before)
    step = 8.0 / 127  # every element within one step of the plain average (each rounding is)
    moved = 0.0
    for name in ("blocks.0.conv.bias", "blocks.3.conv.weight", "classifier.weight"):
        gap = (after[name].double() - expected[name].double()).abs().max()
        assert gap <= step + 1e-6, (name, float(gap))
        moved = max(moved, float((after[name] - before[name]).abs().max()))
    assert moved > 1.0  # the updates (1 to 6) arrived
    torch.testing.assert_close(
        after["blocks.0.norm.running_mean"], expected["blocks.0.norm.running_mean"]
    )


def test_the_logs_of_a_secure_round_hold_no_value_of_any_device(secure_app, caplog):
    """Everything logged (every logger, DEBUG up) while a secure round runs over the API."""
    client = secure_app.test_client()
    coordinator = secure_app.extensions["heterofl"]
    before = global_model(client)
    with caplog.at_level(logging.DEBUG):
        devices = Devices(client, register(client, 3, SECURE))
        assert coordinator.settle()
        _setup(devices, coordinator)
        _upload(devices, coordinator, "train")
        stored = [
            load(coordinator.store.payload(1, Phase.training, row.device_id))["masked"]
            for row in coordinator.store.uploaded(1, Phase.training)
        ]
        true_vectors = list(devices.vectors.values())
        _stage(devices, coordinator, "unmask")
        _upload(devices, coordinator, "statistics")
        statistics_vectors = list(devices.vectors.values())
        stored += [
            load(coordinator.store.payload(1, Phase.statistics, row.device_id))["masked"]
            for row in coordinator.store.uploaded(1, Phase.statistics)
        ]
        _stage(devices, coordinator, "unmask", ("statistics",))
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "round 1 finished" in text  # the round was logged: the check looks at real lines
    # Numbers as the log writes them: whole tokens, not digits inside a hex id or a port.
    integers = set(re.findall(r"(?<![\w.])-?\d+(?![\w.])", text))
    decimals = [float(t) for t in re.findall(r"(?<![\w.])-?\d+\.\d{3,}(?![\w.])", text)]
    # no element of a device's vector (fixed point: numbers of 8 to 10 digits), before or
    # after masking: 6 digits or more, which no count or duration in a log line reaches
    for vector in [*true_vectors, *stored, *statistics_vectors]:
        signed = vector.astype(np.uint32).view(np.int32)
        large = {int(x) for x in signed if abs(int(x)) >= 10**5}
        # (the sBN sums' 16-bit digits are all small: their masked forms stand for them)
        assert large or any(vector is v for v in statistics_vectors)
        for value in sorted(large)[:500]:
            assert str(value) not in integers, value
            assert str(value & 0xFFFFFFFF) not in integers, value
    # none of the updates' values (trained minus the round's starting weights) in decimal
    for position in range(3):
        update = (VALUES[position] - before["blocks.0.conv.weight"].double()).flatten()
        for number in decimals:
            assert not bool((update - number).abs().le(1e-6).any()), number
    # nor the raw payloads, as hex or base64 of any 12-byte run
    for vector in stored:
        raw = vector.tobytes()
        for start in range(0, min(len(raw), 4800), 12):
            piece = raw[start : start + 12]
            assert piece.hex() not in text and b64(piece) not in text


def test_statistics_from_devices_outside_the_round_set_up_their_keys_after_training(make_app):
    """--statistics all with a device outside the round: the statistics instance's keys are
    not set up beside the training instance's (the round never waits for devices it did
    not pick), but after training, and every live device reports."""
    app = make_app(
        secure_aggregation=True, secure_aggregation_clip=8.0, fraction=0.75, min_devices=4
    )
    client = app.test_client()
    coordinator = app.extensions["heterofl"]
    tokens = register(client, 4, SECURE)
    assert coordinator.settle()
    first = {t: client.get("/v1/task", headers=auth(t)).json for t in tokens}
    (outside,) = [t for t, task in first.items() if task["action"] == "wait"]
    in_round = Devices(client, [t for t in tokens if t != outside])
    assert {first[t]["phase"] for t in in_round.tokens} == {"training"}
    _stage(in_round, coordinator, "advertise")  # the training instance's keys alone
    _stage(in_round, coordinator, "share")
    for position, token in enumerate(in_round.tokens):  # levels as drawn: values by position
        task = in_round.task(token)
        assert task["action"] == "train", task
        body = save({"masked": in_round.training_body(position, token, task)})
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    assert coordinator.settle()
    _stage(in_round, coordinator, "unmask")
    everyone = Devices(client, tokens)
    _stage(everyone, coordinator, "advertise", ("statistics",))  # now all four
    _stage(everyone, coordinator, "share", ("statistics",))
    for position, token in enumerate(everyone.tokens):
        task = everyone.task(token)
        assert task["action"] == "statistics" and task["secure"] is not None, task
        body = save({"masked": everyone.statistics_body(position % 3, token, task)})
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    assert coordinator.settle()
    _stage(everyone, coordinator, "unmask", ("statistics",))
    operator = {"Authorization": f"Bearer {coordinator.config.admission.operator_token}"}
    record = client.get("/v1/rounds", headers=operator).json["rounds"][0]
    assert record["state"] == "finished", record
    assert record["metrics"]["statistics_reports"] == 4, record


def test_a_device_that_answered_a_stage_asks_again_sooner_while_the_others_answer(secure_app):
    """The next stage opens the moment the last device answers: one that answered waits a
    quarter of a second, not the poll interval, before asking again."""
    client = secure_app.test_client()
    coordinator = secure_app.extensions["heterofl"]
    poll = coordinator.config.poll_seconds
    assert poll > 0.25
    devices = Devices(client, register(client, 3, SECURE))
    assert coordinator.settle()
    first, *others = devices.tokens
    for _ in BOTH:
        task = devices.task(first)
        assert devices.answer(first, task).status_code == 200
    waiting = devices.task(first)
    assert waiting == {"action": "wait", "retry_after": 0.25}, waiting
    for token in others:
        for _ in BOTH:
            assert devices.answer(token, devices.task(token)).status_code == 200
    assert coordinator.settle()
    assert devices.task(first)["stage"] == "share"  # at its next ask
    _stage(devices, coordinator, "share", BOTH)
    task = devices.task(first)
    body = save({"masked": devices.training_body(0, first, task)})
    assert client.post(task["upload_url"], data=body, headers=auth(first)).status_code == 200
    # waiting for the others' training (no stage open): the poll interval again
    assert devices.task(first) == {"action": "wait", "retry_after": poll}
