"""What coordinator tests share: a config, devices that register, upload and report."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from coordinator.config import CoordinatorConfig
from coordinator.errors import ErrorCode
from heterofl_edge.models import get_architecture
from heterofl_edge.slicing import shapes_at, trainable_names
from heterofl_edge.spec import Policy

ARCH = get_architecture("conv")
PROFILE = {"step_ms": 5.0, "reference_rate": 0.0625, "memory_mb": 4096, "bandwidth_mbps": 50}
LAYERS = [f"blocks.{i}.norm" for i in range(4)]
WIDTHS = [64, 128, 256, 512]


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_config(state_dir, **overrides) -> CoordinatorConfig:
    settings = dict(
        state_dir=state_dir,
        model="conv",
        mode="a1-c1-e1",
        policy=Policy.fix,
        rounds=2,
        fraction=1.0,
        min_devices=3,
        min_uploads=2,
        round_seconds=60.0,
        stats_seconds=30.0,
        max_upload_bytes=16 * 2**20,
        build_artifacts=False,
        device_timeout=300.0,  # fake-clock jumps past deadlines keep devices live
    )
    settings.update(overrides)
    settings["policy"] = Policy(settings["policy"])
    return CoordinatorConfig(**settings)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client, n: int = 3, profile: dict | None = None) -> list[str]:
    tokens = []
    for _ in range(n):
        reply = client.post("/v1/devices", json=profile or PROFILE)
        assert reply.status_code == 201, reply.json
        tokens.append(reply.json["token"])
    return tokens


def constant_update(rate: float, value: float) -> dict[str, torch.Tensor]:
    shapes = shapes_at(ARCH.spec, rate)
    return {n: torch.full(shapes[n], float(value)) for n in trainable_names(ARCH.spec)}


def update_body(tensors, labels=None, num_samples=600, metrics=None) -> bytes:
    metadata = {
        "num_samples": json.dumps(num_samples),
        "metrics": json.dumps(metrics or {"loss": 0.5, "accuracy": 0.9}),
    }
    if labels is not None:
        metadata["labels"] = json.dumps(labels)
    return save(tensors, metadata)


def upload(client, token, number, tensors, labels=None, num_samples=600):
    return client.post(
        f"/v1/rounds/{number}/update",
        data=update_body(tensors, labels, num_samples),
        headers=auth(token),
    )


def statistics_body(count: float, mean: float, var: float = 1.0) -> bytes:
    stats = {}
    for layer, width in zip(LAYERS, WIDTHS, strict=True):
        stats[f"{layer}.count"] = torch.tensor(float(count))
        stats[f"{layer}.mean"] = torch.full((width,), float(mean))
        stats[f"{layer}.var"] = torch.full((width,), float(var))
    return save(stats)


def report_statistics(client, coordinator, tokens) -> None:
    """Every device with a statistics task reports constant sBN statistics; the round settles."""
    coordinator.settle()
    for token in tokens:
        task = client.get("/v1/task", headers=auth(token)).json
        if task["action"] == "statistics":
            body = statistics_body(task["expected_count"], 0.0)
            assert (
                client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
            )
    coordinator.settle()


def global_model(client) -> dict[str, torch.Tensor]:
    return load(client.get("/v1/model").data)


def assert_error(reply, status: int, code: ErrorCode) -> None:
    """An error reply: the status, strict JSON with a known code, a message."""
    assert reply.status_code == status, (reply.status_code, reply.data[:300])
    body = json.loads(reply.data)  # strict: json.loads accepts NaN, so check below
    assert set(body) == {"code", "message", "hint"}, body
    assert body["code"] == code.value, body
    assert ErrorCode(body["code"]) and body["message"]
