"""The coordinator through Flask's test client: a whole round, restarts, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig, LevelPolicy
from coordinator.policy import DeviceProfile, LevelCost, LevelTable, choose_rate
from heterofl_edge.models import get_architecture
from heterofl_edge.slicing import shapes_at, trainable_names

ARCH = get_architecture("conv")
PROFILE = {"step_ms": 5.0, "reference_rate": 0.0625, "memory_mb": 4096, "bandwidth_mbps": 50}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def make_config(state_dir, **overrides):
    settings = dict(
        state_dir=state_dir,
        model="conv",
        mode="a1-c1-e1",
        policy=LevelPolicy.fix,
        rounds=2,
        fraction=1.0,
        min_devices=3,
        min_uploads=2,
        round_seconds=60.0,
        stats_seconds=30.0,
        statistics_query=True,
        max_upload_bytes=16 * 2**20,
    )
    settings.update(overrides)
    return CoordinatorConfig(**settings)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path / "state")


@pytest.fixture
def client(config, clock):
    return create_app(config, clock).test_client()


def register(client, n=3):
    tokens = []
    for _ in range(n):
        reply = client.post("/v1/devices", json=PROFILE)
        assert reply.status_code == 201, reply.json
        tokens.append(reply.json["token"])
    return tokens


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def constant_update(rate, value):
    shapes = shapes_at(ARCH.spec, rate)
    return {n: torch.full(shapes[n], float(value)) for n in trainable_names(ARCH.spec)}


def upload(client, token, number, tensors, labels=None, num_samples=600):
    metadata = {
        "num_samples": json.dumps(num_samples),
        "metrics": json.dumps({"loss": 0.5, "accuracy": 0.9}),
    }
    if labels is not None:
        metadata["labels"] = json.dumps(labels)
    return client.post(
        f"/v1/rounds/{number}/update", data=save(tensors, metadata), headers=auth(token)
    )


def global_model(client):
    return load(client.get("/v1/model").data)


def train_round_with_known_updates(client, tokens):
    """Devices a, c, e (Fix a1-c1-e1) upload 1s, 2s and 6s; e holds labels 0 and 1 only."""
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert [t["action"] for t in tasks] == ["train"] * 3
    assert [t["level"] for t in tasks] == ["a", "c", "e"]
    for token, task, value, labels in zip(
        tokens, tasks, (1, 2, 6), (list(range(10)), list(range(10)), [0, 1]), strict=False
    ):
        weights = load(client.get(task["weights_url"], headers=auth(token)).data)
        assert weights["blocks.0.conv.bias"].shape == (
            ARCH.spec["blocks.0.conv.bias"].dims[0].size(task["rate"]),
        )
        reply = upload(client, token, task["round"], constant_update(task["rate"], value), labels)
        assert reply.status_code == 200, reply.json
    return tasks


EXPECTED_HIDDEN = torch.tensor([3.0] * 4 + [1.5] * 12 + [1.0] * 48)  # widths e=4, c=16, a=64


def test_a_whole_round_merges_known_uploads_exactly(client, clock):
    tokens = register(client)
    train_round_with_known_updates(client, tokens)
    state = global_model(client)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    assert torch.equal(state["blocks.0.norm.weight"], EXPECTED_HIDDEN)
    # Classifier: rows 0, 1 from a, c, e; rows 2..9 from a and c only (e lacks those labels).
    assert torch.equal(state["classifier.bias"], torch.tensor([3.0, 3.0] + [1.5] * 8))
    row = torch.tensor([3.0] * 32 + [1.5] * 96 + [1.0] * 384)
    assert torch.equal(state["classifier.weight"][0], row)

    # The round now asks the three devices for sBN statistics of the global model.
    task = client.get("/v1/task", headers=auth(tokens[0])).json
    assert task["action"] == "statistics" and task["level"] == "a"
    weights = load(client.get(task["weights_url"], headers=auth(tokens[0])).data)
    assert weights["blocks.3.conv.weight"].shape == (512, 256, 3, 3)
    layers = [f"blocks.{i}.norm" for i in range(4)]
    widths = [64, 128, 256, 512]
    for token, (count, mean) in zip(tokens, ((100, 1.0), (300, 3.0), (600, 0.0)), strict=True):
        stats = {}
        for layer, width in zip(layers, widths, strict=True):
            stats[f"{layer}.count"] = torch.tensor(float(count))
            stats[f"{layer}.mean"] = torch.full((width,), mean)
            stats[f"{layer}.var"] = torch.full((width,), 1.0)
        reply = client.post(
            f"/v1/rounds/{task['round']}/statistics", data=save(stats), headers=auth(token)
        )
        assert reply.status_code == 200, reply.json
    state = global_model(client)
    # mean = (100*1 + 300*3 + 600*0) / 1000 = 1.0; var = 1 + (100*0 + 300*4 + 600*1) / 1000 = 2.8
    assert torch.allclose(state["blocks.2.norm.running_mean"], torch.full((256,), 1.0))
    assert torch.allclose(state["blocks.2.norm.running_var"], torch.full((256,), 2.8))
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["state"] == "finished"
    assert (
        history[0]["metrics"]["uploads"] == 3 and history[0]["metrics"]["statistics_reports"] == 3
    )
    assert history[0]["metrics"]["levels"] == {"a": 1, "c": 1, "e": 1}
    assert history[1]["state"] == "training"  # round 2 opened at once


def test_a_restart_in_the_middle_of_a_round_resumes_it(config, clock):
    first = create_app(config, clock).test_client()
    tokens = register(first)
    tasks = [first.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert upload(first, tokens[0], 1, constant_update(1.0, 1), list(range(10))).status_code == 200

    second = create_app(config, clock).test_client()  # a new process on the same state folder
    assert (
        second.get("/v1/task", headers=auth(tokens[0])).json["action"] == "wait"
    )  # a's upload kept
    assert upload(second, tokens[0], 1, constant_update(1.0, 1)).status_code == 409
    assert (
        upload(
            second, tokens[1], 1, constant_update(tasks[1]["rate"], 2), list(range(10))
        ).status_code
        == 200
    )
    assert (
        upload(second, tokens[2], 1, constant_update(tasks[2]["rate"], 6), [0, 1]).status_code
        == 200
    )
    state = global_model(second)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    assert torch.equal(state["classifier.bias"], torch.tensor([3.0, 3.0] + [1.5] * 8))


def test_deadline_with_quorum_finalises_and_records_timeouts(client, clock):
    tokens = register(client)
    client.get("/v1/task", headers=auth(tokens[0]))
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    assert upload(client, tokens[1], 1, constant_update(0.25, 2)).status_code == 200
    clock.now += 61  # device e never answers
    late = upload(client, tokens[2], 1, constant_update(0.0625, 6))
    assert late.status_code == 409 and "deadline" in late.json["error"]
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["metrics"]["timed_out"] == 1
    assert [a["status"] for a in history[0]["assignments"] if a["level"] == "e"] == ["timed_out"]
    assert torch.equal(
        global_model(client)["blocks.0.conv.bias"], torch.tensor([1.5] * 16 + [1.0] * 48)
    )


def test_deadline_without_quorum_fails_the_round_and_keeps_the_model(client, clock):
    tokens = register(client)
    before = global_model(client)
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    clock.now += 61
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["state"] == "failed" and "quorum" in history[0]["metrics"]["reason"]
    after = global_model(client)
    assert all(torch.equal(before[k], after[k]) for k in before)


def good_upload_body(rate=1.0, **metadata_overrides):
    metadata = {"num_samples": "600", "labels": json.dumps(list(range(10)))}
    metadata.update(metadata_overrides)
    return save(constant_update(rate, 1), metadata)


def bad_dtype_body():
    tensors = constant_update(1.0, 1)
    tensors["classifier.bias"] = tensors["classifier.bias"].double()
    return save(tensors)


def nan_body():
    tensors = constant_update(1.0, 1)
    tensors["blocks.1.conv.bias"][3] = float("nan")
    return save(tensors, {"num_samples": "10"})


def inf_body():
    tensors = constant_update(1.0, 1)
    tensors["classifier.weight"][0, 0] = float("inf")
    return save(tensors, {"num_samples": "10"})


@pytest.mark.parametrize(
    ("headers", "path", "body", "status", "needle"),
    [
        ({}, "/v1/rounds/1/update", good_upload_body(), 401, "missing bearer token"),
        (
            {"Authorization": "Bearer nope"},
            "/v1/rounds/1/update",
            good_upload_body(),
            401,
            "unknown token",
        ),
        (
            "a",
            "/v1/rounds/1/update",
            save(constant_update(0.5, 1), {"num_samples": "1"}),
            422,
            "shape",
        ),
        ("a", "/v1/rounds/1/update", bad_dtype_body(), 422, "dtype"),
        ("a", "/v1/rounds/1/update", nan_body(), 422, "NaN"),
        ("a", "/v1/rounds/1/update", inf_body(), 422, "NaN or Inf"),
        ("a", "/v1/rounds/1/update", good_upload_body()[:-100], 400, "safetensors"),
        ("a", "/v1/rounds/1/update", b"\x80\x04pickle", 400, "safetensors"),
        ("a", "/v1/rounds/1/update", b"x" * (16 * 2**20 + 1), 413, "large"),
        ("a", "/v1/rounds/7/update", good_upload_body(), 404, "unknown round 7"),
        ("a", "/v1/rounds/1/update", good_upload_body(num_samples="0"), 400, "num_samples"),
        ("a", "/v1/rounds/1/update", good_upload_body(labels="[0, 99]"), 400, "labels"),
        ("a", "/v1/rounds/1/statistics", save({"x": torch.zeros(1)}), 403, "not asked"),
    ],
)
def test_bad_uploads_get_a_json_4xx_and_change_nothing(
    client, config, headers, path, body, status, needle
):
    tokens = register(client)
    before = global_model(client)
    headers = auth(tokens[0]) if headers == "a" else headers
    reply = client.post(path, data=body, headers=headers)
    assert reply.status_code == status
    assert reply.is_json and needle in reply.json["error"]
    after = global_model(client)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assignments = client.get("/v1/rounds").json["rounds"][0]["assignments"]
    assert {a["status"] for a in assignments} == {"assigned"}
    assert not (config.state_dir / "rounds" / "0001" / "updates").exists()


def test_duplicate_upload_is_a_conflict(client):
    tokens = register(client)
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    again = upload(client, tokens[0], 1, constant_update(1.0, 5))
    assert again.status_code == 409 and "already received" in again.json["error"]


def test_a_device_cannot_upload_for_another_assignment(client, tmp_path):
    tokens = register(client)
    client.post("/v1/devices", json=PROFILE)  # a fourth device, not selected in round 1
    stranger = client.post("/v1/devices", json=PROFILE).json["token"]
    reply = upload(client, stranger, 1, constant_update(1.0, 1))
    assert reply.status_code == 403 and "no assignment" in reply.json["error"]
    wrong_level = upload(client, tokens[2], 1, constant_update(1.0, 1))  # device e sends level a
    assert wrong_level.status_code == 422


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "JSON device profile"),
        (json.dumps([1, 2]).encode(), "JSON object"),
        (json.dumps({**PROFILE, "step_ms": -1}).encode(), "'step_ms' must be a positive number"),
        (json.dumps({**PROFILE, "reference_rate": 0.3}).encode(), "not one of the levels in play"),
        (json.dumps({k: v for k, v in PROFILE.items() if k != "memory_mb"}).encode(), "memory_mb"),
    ],
)
def test_malformed_profiles_are_rejected(client, body, needle):
    reply = client.post("/v1/devices", data=body, content_type="application/json")
    assert reply.status_code == 400 and needle in reply.json["error"]
    assert client.get("/v1/health").json["devices"] == 0


def test_health_openapi_and_json_404(client):
    assert client.get("/v1/health").json["status"] == "ok"
    document = client.get("/v1/openapi.json").json
    assert document["openapi"].startswith("3.") and "/v1/rounds/{round}/update" in document["paths"]
    missing = client.get("/v1/nowhere")
    assert missing.status_code == 404 and missing.is_json


def test_state_dir_of_another_run_is_refused(tmp_path, clock):
    create_app(make_config(tmp_path / "s"), clock)
    with pytest.raises(Exception, match="holds a run of conv, a1-c1-e1, fix"):
        create_app(make_config(tmp_path / "s", mode="a-e", policy=LevelPolicy.dynamic), clock)


def test_profile_policy_picks_the_largest_level_that_fits():
    levels = [
        LevelCost(1.0, 80_000_000, 6_000_000),
        LevelCost(0.25, 5_000_000, 400_000),
        LevelCost(0.0625, 400_000, 26_000),
    ]
    table = LevelTable(round_budget_s=60, steps_per_round=300, memory_factor=8)
    fast = DeviceProfile(step_ms=2, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=100)
    # a: 2 ms * 200 * 300 = 120 s > 60 s; c: 2 ms * 12.5 * 300 = 7.5 s -> c
    assert choose_rate(fast, levels, table) == 0.25
    faster = DeviceProfile(step_ms=0.5, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=100)
    assert choose_rate(faster, levels, table) == 1.0  # 30 s + 1 s transfer
    tiny_memory = DeviceProfile(step_ms=0.5, reference_rate=0.0625, memory_mb=1, bandwidth_mbps=100)
    assert choose_rate(tiny_memory, levels, table) == 0.0625  # nothing fits: the smallest
    slow_link = DeviceProfile(
        step_ms=0.5, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=0.5
    )
    assert choose_rate(slow_link, levels, table) == 0.25  # a's 12 MB each way take 192 s


def test_artifacts_are_exported_on_first_request_with_sha256(tmp_path, clock):
    import hashlib

    config = make_config(tmp_path / "state", artifact_verify=False)
    client = create_app(config, clock).test_client()
    with client.get("/v1/artifacts/conv/e/manifest.json") as reply:
        assert reply.status_code == 200
        manifest = reply.json
    assert manifest["level"] == "e"
    with client.get("/v1/artifacts/conv/e/onnx/train_step.onnx") as reply:
        assert reply.status_code == 200
        digest = reply.headers["X-Content-SHA256"]
        assert digest == hashlib.sha256(reply.data).hexdigest()
    assert digest == manifest["files"]["onnx/train_step.onnx"]["sha256"]
    for path in ("onnx/..%2Fmanifest.json", "onnx/nothing.onnx"):
        assert client.get(f"/v1/artifacts/conv/e/{path}").status_code == 404
    assert client.get("/v1/artifacts/conv/b/manifest.json").status_code == 404  # b is not in play
    assert client.get("/v1/artifacts/resnet18/e/manifest.json").status_code == 404
