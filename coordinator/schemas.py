"""Typed messages of the /v1 API (pydantic): they validate requests and write the OpenAPI.

Request bodies in JSON are parsed strictly (no strings for numbers, no
booleans for numbers, finite numbers within stated bounds). Tensors travel
as safetensors bodies (``application/vnd.safetensors``), described here by
their media type and checked in ``coordinator.intake``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from flask_openapi3 import RawModel
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from coordinator.errors import ErrorCode

__all__ = [
    "MODEL_NAME_PATTERN",
    "SAFETENSORS",
    "Accepted",
    "ArtifactFilePath",
    "ArtifactPath",
    "DemoDataInfo",
    "DemoDataQuery",
    "DeviceList",
    "DeviceProfileIn",
    "DeviceView",
    "DevicesQuery",
    "ErrorReply",
    "Health",
    "Heartbeat",
    "Registered",
    "RoundList",
    "RoundPath",
    "RoundView",
    "SafetensorsBody",
    "TaskReply",
]

SAFETENSORS = "application/vnd.safetensors"
MAX_ROUND = 2**31 - 1
_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
# A model's name may be a user's package.module:factory (checked at start-up too).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"


def _json_integer(value: Any) -> Any:
    """JSON's integers: 2 and 2.0 alike (JSON Schema's rule); never strings or booleans."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class SafetensorsBody(RawModel):
    """A body of safetensors bytes; metadata values are JSON strings."""

    mimetypes: list[str] = [SAFETENSORS, "application/octet-stream"]  # noqa: RUF012


def safetensors_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {SAFETENSORS: {"schema": {"type": "string", "format": "binary"}}},
    }


class ErrorReply(BaseModel):
    code: ErrorCode = Field(description="what went wrong, for programs: decide on this")
    message: str = Field(description="what went wrong, for people")
    hint: str = Field("", description="what to do about it")


class DeviceProfileIn(BaseModel):
    """What a device measured about itself before registering."""

    model_config = ConfigDict(strict=True, extra="ignore")

    step_ms: float = Field(
        gt=0,
        le=1e7,
        allow_inf_nan=False,
        description="median time of one training step of the reference artifact",
    )
    reference_rate: float = Field(gt=0, le=1, allow_inf_nan=False)
    memory_mb: float = Field(gt=0, le=1e9, allow_inf_nan=False)
    bandwidth_mbps: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    runtimes: list[str] = Field(
        default_factory=lambda: ["onnx"],
        max_length=8,
        description="runtimes the device can train on: onnx, executorch, onnx-web",
    )
    num_examples: JsonInt | None = Field(
        None, ge=1, le=10**9, description="examples the device trains on per epoch"
    )


class Registered(BaseModel):
    device_id: str
    token: str = Field(description="send as 'Authorization: Bearer TOKEN' from now on")
    level: str | None = Field(description="the device's level under the profile policy")
    rate: float | None
    policy: str
    poll_seconds: float = Field(description="how often to ask /v1/task while waiting")
    heartbeat_seconds: float = Field(
        description="how often to call /v1/heartbeat while working on a task"
    )


class Hyperparameters(BaseModel):
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    clip_grad_norm: float | None


class ArtifactRef(BaseModel):
    model: str
    level: str
    manifest_url: str
    formats: list[str]


class TaskReply(BaseModel):
    """What the device should do now; the fields present depend on ``action``."""

    action: Literal["train", "statistics", "wait", "done"]
    round: int | None = None
    seed: int | None = Field(None, description="seed of the local batch order (train)")
    level: str | None = None
    rate: float | None = None
    lr: float | None = None
    hyperparameters: Hyperparameters | None = None
    artifact: ArtifactRef | None = None
    weights_url: str | None = None
    upload_url: str | None = None
    deadline: float | None = Field(None, description="seconds since the epoch (server clock)")
    expected_count: int | None = Field(
        None, description="statistics: the examples to summarise (the upload's num_samples)"
    )
    retry_after: float | None = Field(None, description="wait: seconds before asking again")
    rounds: int | None = Field(None, description="done: rounds the run had")


class Accepted(BaseModel):
    accepted: bool
    round: int


class Heartbeat(BaseModel):
    device_id: str
    state: str


class Health(BaseModel):
    status: Literal["ok", "starting", "degraded"]
    model: str
    mode: str
    policy: str
    round: int | None
    round_state: str | None
    completed_rounds: int
    rounds: int
    done: bool
    devices: int
    live_devices: int
    artifacts_ready: bool
    reference_level: str = Field(description="the level devices time to profile themselves")
    reference_rate: float
    demo_data: bool = Field(description="whether GET /v1/demo-data serves demo shards")
    evaluation: dict[str, Any] | None = Field(
        None,
        description="the last finished round's held-out evaluation: {round, global_accuracy, "
        "global_loss, ...}; null before one (or without --eval-data-dir)",
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
    assignments: list[AssignmentView]


class RoundList(BaseModel):
    rounds: list[RoundView]


class ProfileView(BaseModel):
    step_ms: float
    reference_rate: float
    memory_mb: float
    bandwidth_mbps: float
    runtimes: list[str]
    num_examples: int | None = None


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
