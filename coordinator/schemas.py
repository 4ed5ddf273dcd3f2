"""Typed messages of the /v1 API (pydantic): they validate requests and write the OpenAPI.

Request bodies in JSON are parsed strictly (no strings for numbers, no
booleans for numbers, finite numbers within stated bounds). Tensors travel
as safetensors bodies (``application/vnd.safetensors``), described here by
their media type and checked in ``coordinator.intake``.
"""

from __future__ import annotations

from typing import Any, Literal

from flask_openapi3 import RawModel
from pydantic import BaseModel, Field

from heterofl_edge.protocol import (
    Accepted,
    ArtifactRef,
    DeviceProfile,
    ErrorReply,
    Heartbeat,
    Hyperparameters,
    Registered,
    SecAggAnswer,
    TaskMessage,
)
from heterofl_edge.protocol import Health as DeviceHealth

__all__ = [
    "MODEL_NAME_PATTERN",
    "SAFETENSORS",
    "Accepted",
    "ArtifactFilePath",
    "ArtifactPath",
    "ArtifactRef",
    "DemoDataInfo",
    "DemoDataQuery",
    "DeviceList",
    "DeviceProfile",
    "DeviceView",
    "DevicesQuery",
    "ErrorReply",
    "Health",
    "Heartbeat",
    "Hyperparameters",
    "Registered",
    "RoundList",
    "RoundPath",
    "RoundView",
    "SafetensorsBody",
    "SecAggAnswer",
    "TaskMessage",
]  # the device's messages are heterofl_edge.protocol's, re-exported for the API modules

SAFETENSORS = "application/vnd.safetensors"
MAX_ROUND = 2**31 - 1
_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
# A model's name may be a user's package.module:factory (checked at start-up too).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"


class SafetensorsBody(RawModel):
    """A body of safetensors bytes; metadata values are JSON strings."""

    mimetypes: list[str] = [SAFETENSORS, "application/octet-stream"]  # noqa: RUF012


def safetensors_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
    }


class Health(DeviceHealth):
    """The coordinator's status: what a device reads, and the run's progress."""

    status: Literal["ok", "starting", "degraded"]
    round: int | None
    round_state: str | None
    completed_rounds: int
    rounds: int
    devices: int
    live_devices: int
    evaluation: dict[str, Any] | None = Field(
        None,
        description="the last finished round's held-out evaluation: {round, global_accuracy, "
        "global_loss, ...}; null before one (or without --data-dir)",
    )
    privacy: dict[str, Any] | None = Field(
        None,
        description="a differentially private run's budget: epsilon spent at delta, noise "
        "multiplier, clip, placement, max_epsilon, rounds released, and why it stopped early",
    )
    problem: str | None = Field(None, description="the last server fault, if any")


class AssignmentView(BaseModel):
    device_id: str
    level: str
    status: str = Field(description="assigned | training | uploaded | missed")
    statistics: str = Field(description="none | asked | uploaded | missed")
    num_samples: int | None
    seconds: float | None
    metrics: dict[str, float] | None
    download_encoding: str = Field(description="fp32 | fp16 | bf16 | int8: its weights")
    upload_encoding: str = Field(description="fp32 (weights) | fp16 | bf16 | int8 (update)")
    bytes_down: int | None = Field(
        None, description="bytes of weights it fetched in this round (training and statistics)"
    )
    bytes_up: int | None = Field(
        None,
        description="bytes of its accepted results in this round (null: none, or the "
        "round ran before the coordinator's last start)",
    )


class RoundView(BaseModel):
    round: int
    state: str = Field(description="training | statistics | finished | failed")
    lr: float
    opened_at: float
    deadline: float
    closed_at: float | None
    finished_at: float | None
    selected: int
    uploads: int
    quorum: int
    metrics: dict[str, Any] = Field(
        description="the round's result once it ends: losses, evaluation, durations"
    )
    transfer: dict[str, Any] = Field(
        description="payload bytes since the coordinator started: {down, up: {train, "
        "statistics: {encoding: {bytes, payloads}}}, devices: {id: {down, up}}}"
    )
    assignments: list[AssignmentView]


class RoundList(BaseModel):
    rounds: list[RoundView]


class ProfileView(BaseModel):
    step_ms: float
    reference_rate: float
    memory_mb: float
    base_memory_mb: float | None = None
    bandwidth_mbps: float
    runtimes: list[str]
    num_examples: int | None = None
    encodings: list[str] | None = Field(None, description="what it declared (null: fp32 only)")


class DeviceView(BaseModel):
    device_id: str
    position: int
    state: str = Field(description="online | selected | training | late | offline")
    level: str | None = Field(description="its level in the open round, else its profile level")
    trained_level: str | None = Field(
        None, description="the level it last trained: of its last uploaded training task"
    )
    profile: ProfileView
    registered_at: float
    last_seen: float
    bytes_in: int
    bytes_out: int


class DeviceList(BaseModel):
    policy: str
    levels: dict[str, float] = Field(description="share of the devices at each level")
    devices: list[DeviceView] = Field(description="the page of devices, by position")
    total: int = Field(description="registered devices in all")
    offset: int
    limit: int


class DevicesQuery(BaseModel):
    offset: int = Field(0, ge=0, le=10**9, description="devices to skip, by position")
    limit: int = Field(100, ge=1, le=500, description="devices per page")


class DemoDataQuery(BaseModel):
    shard: int = Field(0, ge=0, le=100_000, description="which shard, 0..clients-1")
    clients: int = Field(
        100, ge=1, le=100_000, description="shards the data set is split into (the paper's 100)"
    )
    split: Literal["iid", "non-iid"] = "iid"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    train_examples: int | None = Field(
        None, ge=1, le=60_000, description="split only the first examples of a seeded draw"
    )


class DemoDataInfo(BaseModel):
    """What GET /v1/demo-data with the same query sends, before it is downloaded."""

    examples: int
    bytes: int = Field(description="size of the safetensors reply")
    shape: list[int] = Field(description="x's shape: [N, C, H, W]")
    dtype: Literal["uint8", "float32"] = Field(
        description="uint8 pixels (with metadata 'normalise') or float32 model inputs"
    )
    shard: int
    clients: int
    split: str
    seed: int
    source: str


class RoundPath(BaseModel):
    number: int = Field(ge=1, le=MAX_ROUND, description="round number")


class ArtifactPath(BaseModel):
    model: str = Field(pattern=MODEL_NAME_PATTERN)
    level: str = Field(pattern=_NAME)


class ArtifactFilePath(ArtifactPath):
    fmt: str = Field(pattern=_NAME)
    name: str = Field(pattern=_NAME)
