"""Compressed transport through the coordinator (issue 31): tasks, uploads, refusals, bytes.

Three devices at levels a, c and e (Fix a1-c1-e1, every device selected): weights go
down in the run's download encoding and results come up in its upload encoding, per
level, as far as each device declared them. A lossy upload is an update; the model must
be HeteroFL's average of the weights the devices' updates stand for, bit for bit.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from coordinator_helpers import (
    ARCH,
    PROFILE,
    assert_error,
    auth,
    global_model,
    make_config,
    report_statistics,
    statistics_body,
)
from safetensors import deserialize
from test_hostile_input import state_snapshot

from coordinator.errors import ErrorCode
from heterofl_edge.aggregation import HeteroFLAggregator
from heterofl_edge.encoding import (
    Encoding,
    UpdateEncoder,
    apply_update,
    decode_payload,
    encode_payload,
    upload_seed,
)
from heterofl_edge.errors import ConfigError
from heterofl_edge.protocol import UploadMetadata
from heterofl_edge.slicing import trainable_names

EVERY = ["fp32", "fp16", "bf16", "int8"]
LABELS = (list(range(10)), list(range(10)), [0, 1])  # a and c hold every label, e two
TARGETS = (1.0, 2.0, 6.0)  # what each device's training ends at


def mixed(make_app, tmp_path, declared=(EVERY, EVERY, EVERY), **overrides):
    """A coordinator of three devices (a, c, e) that declared ``declared``; their tokens."""
    settings = dict(download_encoding="fp32,e=bf16", upload_encoding="fp32,c=fp16,e=int8", rounds=1)
    settings.update(overrides)
    app = make_app(make_config(tmp_path / "state", **settings))
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = []
    for encodings in declared:
        profile = dict(PROFILE) if encodings is None else {**PROFILE, "encodings": encodings}
        reply = client.post("/v1/devices", json=profile)
        assert reply.status_code == 201, reply.json
        tokens.append(reply.json["token"])
    coordinator.settle()
    return app, client, coordinator, tokens


def train(client, token, task, target: float, labels, encoder: UpdateEncoder | None = None):
    """Fetch the task's weights, 'train' every tensor to ``target``, encode as told."""
    download = client.get(task["weights_url"], headers=auth(token))
    assert download.status_code == 200
    received = decode_payload(download.data)
    assert received.encoding is Encoding(task["download_encoding"])
    names = trainable_names(ARCH.spec)
    trained = {n: np.full_like(received.arrays[n], target) for n in names}
    metadata = UploadMetadata(num_samples=600, labels=labels, metrics={"loss": 0.5})
    body = (encoder or UpdateEncoder()).encode(
        trained,
        {n: received.arrays[n] for n in names},
        Encoding(task["upload_encoding"]),
        task["rounding_seed"],
        task["level"],
        task["error_feedback"],
        metadata.to_metadata(),
    )
    return body, {n: received.arrays[n] for n in names}


def sent_weights(body: bytes, received) -> dict[str, torch.Tensor]:
    """The weights an upload stands for, as the coordinator must read it."""
    decoded = decode_payload(body)
    arrays = apply_update(received, decoded.arrays) if decoded.encoding.lossy else decoded.arrays
    return {n: torch.from_numpy(np.array(a)) for n, a in arrays.items()}


def test_each_task_states_the_encodings_its_device_declared(make_app, tmp_path):
    _, client, _, tokens = mixed(make_app, tmp_path, declared=(EVERY, ["fp16"], None))
    a, c, e = (client.get("/v1/task", headers=auth(t)).json for t in tokens)
    assert [t["level"] for t in (a, c, e)] == ["a", "c", "e"]
    assert (a["download_encoding"], a["upload_encoding"], a["encoding_note"]) == (
        "fp32",
        "fp32",
        None,
    )
    assert (c["download_encoding"], c["upload_encoding"]) == ("fp32", "fp16")
    assert c["rounding_seed"] == upload_seed(c["seed"]) and c["error_feedback"] is False
    # An older device declared nothing: fp32 both ways, and the task says why.
    assert (e["download_encoding"], e["upload_encoding"]) == ("fp32", "fp32")
    assert "download bf16 and upload int8 at level e" in e["encoding_note"]
    devices = client.get("/v1/devices").json["devices"]
    assert [d["profile"]["encodings"] for d in devices] == [EVERY, ["fp16"], None]


def test_lossy_uploads_are_folded_as_the_weights_their_updates_stand_for(make_app, tmp_path):
    _, client, coordinator, tokens = mixed(make_app, tmp_path, error_feedback=True)
    before = global_model(client)
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert [t["upload_encoding"] for t in tasks] == ["fp32", "fp16", "int8"]
    assert [t["error_feedback"] for t in tasks] == [False, True, True]
    aggregator = HeteroFLAggregator(before, ARCH.spec)
    sizes = []
    for token, task, target, labels in zip(tokens, tasks, TARGETS, LABELS, strict=True):
        body, received = train(client, token, task, target, labels)
        reply = client.post(task["upload_url"], data=body, headers=auth(token))
        assert reply.status_code == 200, reply.json
        aggregator.add(sent_weights(body, received), task["rate"], labels)
        sizes.append(len(body))
    report_statistics(client, coordinator, tokens)
    after = global_model(client)
    expected = aggregator.finalize()
    for name in trainable_names(ARCH.spec):
        assert torch.equal(after[name], expected[name]), name
    # The int8 update is lossy: e's rows are 6 within one step (6 - received) / 127, not 6.
    e_rows = after["classifier.bias"][:2]
    assert not torch.equal(e_rows, before["classifier.bias"][:2])

    rounds = client.get("/v1/rounds").json["rounds"]
    assignments = {a["level"]: a for a in rounds[0]["assignments"]}
    assert {k: (a["download_encoding"], a["upload_encoding"]) for k, a in assignments.items()} == {
        "a": ("fp32", "fp32"),
        "c": ("fp32", "fp16"),
        "e": ("bf16", "int8"),
    }
    statistics = len(statistics_body(600, 0.0))  # each device's sBN report, fp32
    assert [assignments[k]["bytes_up"] for k in "ace"] == [s + statistics for s in sizes]
    transfer = rounds[0]["transfer"]
    assert transfer["up"]["train"] == {
        enc: {"bytes": size, "payloads": 1}
        for enc, size in zip(("fp32", "fp16", "int8"), sizes, strict=True)
    }
    down = transfer["down"]["train"]
    assert set(down) == {"fp32", "bf16"} and down["fp32"]["payloads"] == 2
    metrics = client.get("/metrics").data.decode()
    assert (
        f'heterofl_payload_bytes_total{{direction="up",encoding="int8",kind="train"}} '
        f"{float(sizes[2])}" in metrics
    )
    assert 'heterofl_payloads_total{direction="down",encoding="bf16",kind="train"} 1.0' in metrics


def scales_entry(values) -> str:
    return base64.b64encode(np.array(values, "<f4").tobytes()).decode()


def relabelled(body: bytes, **changes) -> bytes:
    """``body`` with metadata keys replaced (None: removed), its tensors untouched."""
    length = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + length])
    metadata = header["__metadata__"]
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body[8 + length :]


def test_uploads_that_break_their_encoding_are_refused_and_change_nothing(make_app, tmp_path):
    app, client, coordinator, tokens = mixed(make_app, tmp_path)
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    e_token, e_task = tokens[2], tasks[2]
    good, received = train(client, e_token, e_task, 6.0, LABELS[2])
    scales = json.loads(
        json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])["__metadata__"]["scales"]
    )
    rows = {n: len(base64.b64decode(s)) // 4 for n, s in scales.items()}
    name = "blocks.1.conv.weight"

    def with_scale(values):
        return relabelled(good, scales=json.dumps({**scales, name: scales_entry(values)}))

    as_fp32 = encode_payload(
        {n: np.full_like(a, 6.0) for n, a in received.items()},
        Encoding.fp32,
        metadata=UploadMetadata(num_samples=600, labels=[0, 1]).to_metadata(),
    )
    huge = {n: scales_entry([3e38] * k) for n, k in rows.items()}  # received + update overflows
    hostile = [
        (as_fp32, ErrorCode.wrong_encoding),  # the weights, when the task asks for an int8 update
        (relabelled(good, encoding='"fp16"'), ErrorCode.wrong_encoding),
        (relabelled(good, encoding='"int4"'), ErrorCode.bad_metadata),
        (with_scale([float("nan")] * rows[name]), ErrorCode.bad_scales),
        (with_scale([0.0] * rows[name]), ErrorCode.bad_scales),
        (with_scale([-1.0] * rows[name]), ErrorCode.bad_scales),
        (with_scale([1.0] * (rows[name] - 1)), ErrorCode.bad_scales),  # one scale short
        (with_scale([1.0] * (rows[name] + 1)), ErrorCode.bad_scales),
        (relabelled(good, scales=None), ErrorCode.bad_scales),
        (relabelled(good, scales=json.dumps(huge)), ErrorCode.not_finite),
    ]
    a_good, _ = train(client, tokens[0], tasks[0], 1.0, LABELS[0])  # a fetches its weights
    assert dict(deserialize(a_good))["classifier.bias"]["dtype"] == "F32"
    before = state_snapshot(app, tmp_path / "state")
    for body, code in hostile:
        reply = client.post(e_task["upload_url"], data=body, headers=auth(e_token))
        assert_error(reply, 422 if code is not ErrorCode.bad_metadata else 400, code)
        assert state_snapshot(app, tmp_path / "state") == before
    # A device told fp32 that sends an int8 update is refused too.
    reply = client.post(tasks[0]["upload_url"], data=good, headers=auth(tokens[0]))
    assert_error(reply, 422, ErrorCode.wrong_encoding)
    assert state_snapshot(app, tmp_path / "state") == before
    # Nothing was folded: the valid uploads make the model they make alone.
    before_model = global_model(client)
    aggregator = HeteroFLAggregator(before_model, ARCH.spec)
    for token, task, target, labels in zip(tokens, tasks, TARGETS, LABELS, strict=True):
        body, start = (
            (good, received) if token == e_token else train(client, token, task, target, labels)
        )
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
        aggregator.add(sent_weights(body, start), task["rate"], labels)
    report_statistics(client, coordinator, tokens)
    after, expected = global_model(client), aggregator.finalize()
    assert all(torch.equal(after[n], expected[n]) for n in trainable_names(ARCH.spec))


def test_stored_lossy_uploads_survive_a_restart_and_fold_the_same(make_app, tmp_path):
    config = make_config(
        tmp_path / "state",
        download_encoding="fp16",
        upload_encoding="int8",
        rounds=1,
    )
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = [
        client.post("/v1/devices", json={**PROFILE, "encodings": EVERY}).json["token"]
        for _ in range(3)
    ]
    coordinator.settle()
    before = global_model(client)
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    aggregator = HeteroFLAggregator(before, ARCH.spec)
    bodies, downloads = [], {}
    for token, task, target, labels in zip(tokens, tasks, TARGETS, LABELS, strict=True):
        downloads[task["level"]] = client.get(task["weights_url"], headers=auth(token)).data
        body, received = train(client, token, task, target, labels)
        bodies.append(body)
        aggregator.add(sent_weights(body, received), task["rate"], labels)
    for token, task, body in zip(tokens[:2], tasks[:2], bodies[:2], strict=True):
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    coordinator.close()
    restarted = make_app(config)  # the same downloads again: their seeds are the run's

    def client_download(task):
        return downloads[task["level"]]

    client, coordinator = restarted.test_client(), restarted.extensions["heterofl"]
    coordinator.settle()
    again = client.get(tasks[2]["weights_url"], headers=auth(tokens[2]))
    before_restart, after_restart = (
        decode_payload(d) for d in (client_download(tasks[2]), again.data)
    )  # the same tensors as before the restart (metadata keys may come in another order)
    assert after_restart.encoding is before_restart.encoding is Encoding.fp16
    assert all(np.array_equal(after_restart.arrays[n], a) for n, a in before_restart.arrays.items())
    reply = client.post(tasks[2]["upload_url"], data=bodies[2], headers=auth(tokens[2]))
    assert reply.status_code == 200, reply.json
    report_statistics(client, coordinator, tokens)
    after, expected = global_model(client), aggregator.finalize()
    assert all(torch.equal(after[n], expected[n]) for n in trainable_names(ARCH.spec))


@pytest.mark.parametrize("encodings", [["fp8"], ["fp32"] * 9])
def test_a_registration_declaring_unknown_or_too_many_encodings_is_refused(
    client, coordinator, encodings
):
    reply = client.post("/v1/devices", json={**PROFILE, "encodings": encodings})
    assert_error(reply, 400, ErrorCode.bad_profile)


def test_an_open_round_resumes_only_with_the_encodings_it_was_opened_with(make_app, tmp_path):
    config = make_config(tmp_path / "state", upload_encoding="int8", rounds=2)
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    for _ in range(3):
        client.post("/v1/devices", json={**PROFILE, "encodings": EVERY})
    coordinator.settle()  # round 1 is open, its updates to come in int8
    coordinator.close()
    changed = make_config(tmp_path / "state", upload_encoding="fp16", rounds=2)
    with pytest.raises(ConfigError, match=r"round 1 was opened with .* --upload-encoding int8"):
        make_app(changed)
    again = make_app(config)  # the same encodings: the round goes on
    again.extensions["heterofl"].settle()
    assert again.test_client().get("/v1/health").json["round"] == 1
