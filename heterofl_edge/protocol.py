"""The device protocol's messages, typed once for the coordinator and every device.

These pydantic models are the ``/v1`` wire format: the coordinator validates
requests with them and writes its OpenAPI document from them
(``coordinator.schemas``), the Python device parses replies into them and
builds its requests from them (``device_sim.protocol``), and the browser's
``web/protocol.js`` declares the fields it reads and sends, which a test
checks against the served document. No torch: a device installs this.

Replies a device reads ignore fields they do not know (a newer coordinator
may add some); requests the coordinator reads are strict (no strings for
numbers, finite numbers within bounds, unknown fields dropped). Tensors
travel as safetensors bodies; what an upload says besides its tensors is
``UploadMetadata``, carried as the body's JSON-string metadata.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, Strict

from heterofl_edge.encoding import Encoding

__all__ = [
    "Accepted",
    "ArtifactRef",
    "DeviceProfile",
    "DistributedNoise",
    "DoneTask",
    "Encoding",
    "ErrorCode",
    "ErrorReply",
    "Health",
    "Heartbeat",
    "Hyperparameters",
    "Registered",
    "Runtime",
    "SecAggAnswer",
    "SecAggPeer",
    "SecAggTask",
    "SecureMasking",
    "StatisticsTask",
    "TaskMessage",
    "TaskReply",
    "TrainTask",
    "UnknownTask",
    "UploadMetadata",
    "WaitTask",
    "parse_task",
]


class ErrorCode(StrEnum):
    """Every code an error reply can carry; a device decides on these, never on messages."""

    invalid_request = "invalid_request"  # a path, query or JSON body that does not parse
    bad_profile = "bad_profile"  # a registration profile out of bounds
    insufficient_memory = "insufficient_memory"  # the device's memory limit fits no level
    unsupported_runtime = "unsupported_runtime"  # none of the device's runtimes is offered
    bad_payload = "bad_payload"  # a body that is not a readable safetensors payload
    bad_metadata = "bad_metadata"  # safetensors metadata missing, malformed or out of bounds
    missing_token = "missing_token"
    unknown_token = "unknown_token"
    enrollment_required = "enrollment_required"  # registration needs the enrollment token
    bad_enrollment_token = "bad_enrollment_token"
    operator_token_required = "operator_token_required"  # the operator's views need its token
    too_many_registrations = "too_many_registrations"  # per-address rate limit (Retry-After)
    not_assigned = "not_assigned"  # the device has no such task in that round
    unknown_round = "unknown_round"
    not_found = "not_found"
    demo_shard_too_large = "demo_shard_too_large"  # a demo shard above the served cap
    method_not_allowed = "method_not_allowed"
    request_timeout = "request_timeout"  # the request did not arrive in time
    round_closed = "round_closed"  # the round (or its phase) closed before this arrived
    # Buffered aggregation: the update started from a model version more than the
    # staleness bound behind the newest one; like round_closed, take the next task.
    stale_update = "stale_update"
    duplicate_upload = "duplicate_upload"
    payload_too_large = "payload_too_large"
    wrong_tensors = "wrong_tensors"  # names do not match the level
    bad_dtype = "bad_dtype"
    bad_shape = "bad_shape"
    not_finite = "not_finite"
    bad_labels = "bad_labels"
    bad_statistics = "bad_statistics"
    wrong_encoding = "wrong_encoding"  # an upload in another encoding than its task's
    bad_scales = "bad_scales"  # int8 scales missing, miscounted, NaN, zero or negative
    not_ready = "not_ready"  # artifacts still being built (server side, retry later)
    storage_error = "storage_error"  # the disk or database failed (server side)
    too_many_connections = "too_many_connections"  # the address's connection cap (retry)
    internal_error = "internal_error"  # a bug (server side)
    # secure aggregation (heterofl_edge.secagg): a message that does not fit the protocol
    secure_aggregation_unsupported = "secure_aggregation_unsupported"  # a run that masks
    replayed_key = "replayed_key"  # a public key advertised before in the instance
    duplicate_advertisement = "duplicate_advertisement"
    bad_key = "bad_key"  # not a P-256 point, or both keys equal
    unknown_peer = "unknown_peer"  # a share for (or of) a client that is not a neighbour
    bad_share = "bad_share"  # missing, malformed or outside the field
    wrong_length = "wrong_length"  # a masked vector of another length than the layout's
    bad_modulus = "bad_modulus"  # a masked vector not of uint32 (Z_2^32) elements
    duplicate_unmask = "duplicate_unmask"  # a second unmasking answer


class Runtime(StrEnum):
    """Every runtime a device may declare at registration."""

    onnx = "onnx"  # Python onnxruntime (device_sim)
    onnx_web = "onnx-web"  # onnxruntime-web in a browser (web/)
    executorch = "executorch"  # ExecuTorch's training API (a native app, or device_sim)

    @property
    def artifact_format(self) -> str:
        """The exported format it trains: onnx or executorch."""
        return "executorch" if self is Runtime.executorch else "onnx"


def _json_integer(value: Any) -> Any:
    """JSON's integers: 2 and 2.0 alike (JSON Schema's rule); never strings or booleans."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class _Reply(BaseModel):
    """A message the coordinator sends: a device ignores fields it does not know."""

    model_config = ConfigDict(extra="ignore")


class ErrorReply(_Reply):
    code: ErrorCode = Field(description="what went wrong, for programs: decide on this")
    message: str = Field(description="what went wrong, for people")
    hint: str = Field("", description="what to do about it")


class Health(_Reply):
    """The coordinator's status (``GET /v1/health``): what a device reads before registering."""

    model: str
    mode: str
    policy: str
    artifacts_ready: bool
    done: bool
    reference_level: str = Field(description="the level devices time to profile themselves")
    reference_rate: float
    demo_data: bool = Field(description="whether GET /v1/demo-data serves demo shards")
    run_id: str | None = Field(
        None,
        description="this run's identity, made once per state folder: a device that keeps its "
        "registration (--state-dir) resumes it only with the run it registered with",
    )


# -- registration ---------------------------------------------------------------------


class DeviceProfile(BaseModel):
    """What a device measured about itself before registering (``POST /v1/devices``)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    step_ms: float = Field(
        gt=0,
        le=1e7,
        allow_inf_nan=False,
        description="median time of one training step of the reference artifact",
    )
    reference_rate: float = Field(gt=0, le=1, allow_inf_nan=False)
    memory_mb: float = Field(
        gt=0,
        le=1e9,
        allow_inf_nan=False,
        description="memory the device may use (a device with --max-memory-mb: that limit)",
    )
    base_memory_mb: float | None = Field(
        None,
        ge=0,
        le=1e9,
        allow_inf_nan=False,
        description="memory the device's process holds before it loads a level (measured); a "
        "level fits when this plus the level's training memory is within memory_mb",
    )
    bandwidth_mbps: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    runtimes: list[Annotated[Runtime, Strict(False)]] = Field(
        default_factory=lambda: [Runtime.onnx],
        min_length=1,
        max_length=len(Runtime),
        description="runtimes the device can train on (onnx and onnx-web train the onnx "
        "artifacts, executorch the executorch ones)",
    )
    num_examples: JsonInt | None = Field(
        None, ge=1, le=10**9, description="examples the device trains on per epoch"
    )
    secure_aggregation: bool = Field(
        False,
        description="the device masks its uploads (SecAgg+); a run with secure aggregation "
        "refuses a device without it",
    )
    encodings: list[Annotated[Encoding, Strict(False)]] | None = Field(
        None,
        max_length=2 * len(Encoding),
        description="encodings the device can decode (weights) and encode (updates); absent: "
        "fp32 only. A task never uses one the device did not declare",
    )
    enrollment_token: str | None = Field(
        None,
        max_length=256,
        description="the coordinator's enrollment token, where it requires one (never stored)",
    )


class Registered(_Reply):
    device_id: str
    token: str = Field(description="send as 'Authorization: Bearer TOKEN' from now on")
    level: str | None = Field(description="the device's level under the profile policy")
    rate: float | None
    policy: str
    max_level: str | None = Field(
        None, description="the largest level whose training fits the device's memory"
    )
    max_rate: float | None = Field(
        None, description="that level's rate: the device is never given a larger one"
    )
    poll_seconds: float = Field(description="how often to ask /v1/task while waiting")
    heartbeat_seconds: float = Field(
        description="how often to call /v1/heartbeat while working on a task"
    )


# -- tasks ---------------------------------------------------------------------------------


class Hyperparameters(_Reply):
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    clip_grad_norm: float | None


class ArtifactRef(_Reply):
    model: str
    level: str
    manifest_url: str
    formats: list[str]


class _Work(_Reply):
    """What every task with work in it carries."""

    round: int
    level: str
    rate: float
    artifact: ArtifactRef
    weights_url: str = Field(description="GET: the sub-model to start from (safetensors)")
    upload_url: str = Field(description="POST: the result (safetensors)")
    deadline: float = Field(description="seconds since the epoch (server clock)")
    heartbeat_seconds: float = Field(
        description="call /v1/heartbeat this often until the result is uploaded (a device "
        "silent for the coordinator's device timeout is dropped)"
    )
    download_encoding: Encoding = Field(
        Encoding.fp32,
        description="how weights_url's tensors are encoded (its metadata says so too)",
    )
    encoding_note: str | None = Field(
        None,
        description="set when the run's encoding for this level was replaced by fp32 because "
        "the device did not declare it",
    )


class DistributedNoise(_Reply):
    """Differential privacy with the noise added on the devices (``--dp-placement distributed``).

    Clip the update (trained minus received) to L2 norm ``clip`` over the whole
    slice; then add to each element held by k clients this round N(0, (noise_multiplier
    * clip)^2 / (reporting_fraction * k)). ``sizes`` gives, per trainable tensor and width
    dimension, its size at each rate in ``round_rates`` (the rates of every client selected
    this round, public): an element is held by the clients whose every width size exceeds its
    index in that dimension.
    """

    clip: float
    noise_multiplier: float
    reporting_fraction: float
    round_rates: list[float]
    sizes: dict[str, list[list[int]]] = Field(
        description="tensor -> per dimension, each selected client's size of one block of it "
        "(a width dimension is one block, a per-head one a block per head; fixed: -1)"
    )
    blocks: dict[str, list[int]] = Field(
        description="tensor -> per dimension, its number of equal blocks (0: fixed)"
    )


class SecureMasking(_Reply):
    """How to encode and mask this task's upload (secure aggregation, ``heterofl_edge.secagg``).

    Upload a safetensors body holding one tensor ``masked`` and no metadata: its
    elements in Z_{2^modulus_bits}, as uint16 up to 16 bits, else uint32.
    Training: the update (trained minus received) laid out by ``plan``
    (``LayoutPlan.to_json``), each value clipped to ``clip`` and encoded as
    ``encoding`` says: ``fixed_point`` rounds ``x * scale`` to nearest (32 bits);
    ``int8`` rounds ``x / (clip / 127)`` stochastically with the task's
    ``rounding_seed`` (``SharedInt8``). Statistics: count, sum and sum of squares
    of ``layers`` wide-encoded at ``statistics_scale`` (32 bits).
    ``peers``: neighbour index -> its rate (whose masks to add); ``ciphertexts``:
    neighbour index -> its encrypted shares for this device (base64), kept for
    the unmasking.
    """

    context: str
    index: int
    peers: dict[str, float]
    ciphertexts: dict[str, str]
    encoding: Literal["fixed_point", "int8"] = "fixed_point"
    scale: float | None = None
    clip: float | None = None
    modulus_bits: int = Field(default=32, ge=8, le=32)
    plan: dict[str, Any] | None = None
    layers: list[tuple[str, int]] = Field(default_factory=list)
    statistics_scale: float | None = None


class TrainTask(_Work):
    """Train E local epochs from the round's weights, then upload them (or their update)."""

    action: Literal["train"] = "train"
    seed: int = Field(description="seed of the local batch order")
    lr: float
    hyperparameters: Hyperparameters
    private: bool = Field(
        False,
        description="a differentially private run: upload no labels, metrics or example count",
    )
    distributed_noise: DistributedNoise | None = Field(
        None, description="add this noise to the clipped update before uploading it"
    )
    secure: SecureMasking | None = Field(
        None, description="secure aggregation: upload the masked update only"
    )
    upload_encoding: Encoding = Field(
        Encoding.fp32,
        description="fp32: upload the trained weights; fp16, bf16, int8: upload the update "
        "(trained minus the weights received), in that encoding, with metadata 'encoding'",
    )
    rounding_seed: int = Field(
        0, description="SplitMix64 seed of int8 stochastic rounding (in [0, 2**32))"
    )
    error_feedback: bool = Field(
        False,
        description="add what the last lossy upload at this level lost to this update",
    )


class StatisticsTask(_Work):
    """Summarise every example with the global model's statistics program (sBN).

    In a private run (``private``) each layer's ``count`` is 1: the report weighs as one
    client, and the coordinator learns nothing of the example count.
    """

    action: Literal["statistics"] = "statistics"
    expected_count: int | None = Field(
        description="the examples to summarise (each layer's count in the upload)"
    )
    private: bool = Field(False, description="a differentially private run: count 1")
    secure: SecureMasking | None = Field(
        None, description="secure aggregation: upload the masked sums only"
    )


class SecAggPeer(_Reply):
    index: int
    c_public: str = Field(description="base64 of a 65-byte uncompressed P-256 point")
    s_public: str


class SecAggTask(_Reply):
    """A secure aggregation stage (``heterofl_edge.secagg``): answer at ``answer_url``.

    ``advertise``: make fresh keys for ``context`` and send both public keys;
    ``share``: send Shamir shares of your secrets for each of ``neighbours``,
    encrypted, at ``threshold``; ``unmask``: send your shares of the ``s`` keys of
    ``dropped`` and of the self-mask seeds of ``survivors``.
    """

    action: Literal["secagg"] = "secagg"
    round: int
    phase: str = Field(description="training or statistics")
    stage: Literal["advertise", "share", "unmask"]
    context: str
    index: int
    answer_url: str
    deadline: float
    heartbeat_seconds: float
    threshold: int | None = None
    neighbours: list[SecAggPeer] = Field(default_factory=list)
    dropped: list[int] = Field(default_factory=list)
    survivors: list[int] = Field(default_factory=list)


class WaitTask(_Reply):
    action: Literal["wait"] = "wait"
    retry_after: float = Field(description="seconds before asking again")


class DoneTask(_Reply):
    action: Literal["done"] = "done"
    rounds: int = Field(description="rounds the run had")


TaskReply = Annotated[
    TrainTask | StatisticsTask | SecAggTask | WaitTask | DoneTask, Field(discriminator="action")
]


class TaskMessage(RootModel[TaskReply]):
    """What the device should do now (``GET /v1/task``), told apart by ``action``."""


class UnknownTask(WaitTask):
    """A task a device cannot do (a newer coordinator's action), read as a wait."""

    asked: str = ""  # the action the coordinator asked for, to say so once


def parse_task(data: Any, default_wait: float) -> TaskReply:
    """A task reply read by a device; an action it does not know reads as a wait.

    A newer coordinator may ask for work this device cannot do: it waits
    ``retry_after`` (or ``default_wait``) and asks again, instead of failing
    (``UnknownTask`` says which action it was).
    """
    known = ("train", "statistics", "secagg", "wait", "done")
    if isinstance(data, dict) and data.get("action") not in known:
        pause = data.get("retry_after")
        return UnknownTask(
            retry_after=pause if isinstance(pause, int | float) else default_wait,
            asked=str(data.get("action"))[:64],
        )
    return TaskMessage.model_validate(data).root


# -- results ---------------------------------------------------------------------------------


class SecAggAnswer(BaseModel):
    """A device's answer to a ``SecAggTask`` (``POST answer_url``); base64 bytes, decimal shares.

    advertise: ``c_public`` and ``s_public``; share: ``shares`` (neighbour index
    -> ciphertext); unmask: ``unmask`` (client index -> share, a decimal integer).
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    context: str = Field(max_length=200)
    stage: Literal["advertise", "share", "unmask"]
    c_public: str | None = Field(None, max_length=200)
    s_public: str | None = Field(None, max_length=200)
    shares: dict[str, str] | None = Field(None, max_length=10_000)
    unmask: dict[str, str] | None = Field(None, max_length=10_000)


class Heartbeat(_Reply):
    device_id: str
    state: str


class Accepted(_Reply):
    accepted: bool
    round: int


class UploadMetadata(BaseModel):
    """What a training upload says besides its tensors (the safetensors metadata).

    A lossy upload (the task's ``upload_encoding``) adds ``encoding`` and, for
    int8, ``scales`` (``heterofl_edge.encoding.payload_metadata``).
    """

    num_samples: int | None = Field(
        None, ge=1, description="examples trained on (each epoch; none in a private run)"
    )
    labels: list[int] | None = Field(
        None, description="the labels held (the classifier rows this update counts for)"
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the session's loss, accuracy, steps (finite numbers)"
    )

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata: each field as a JSON string (absent ones left out)."""
        return {
            name: json.dumps(value)
            for name, value in self.model_dump().items()
            if value is not None
        }
