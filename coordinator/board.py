"""The task board: the round engine's transport over HTTP.

The engine publishes a phase's tasks here (``open_phase``); request threads
answer devices from the published view (``task_for``, ``weights_for``) and
accept their results (``accept_update``, ``accept_statistics``); the engine
reads accepted results back (``replies``) and closes the phase
(``close_phase``).

A request does bounded work and never waits for the engine: it reads an
immutable view, validates what it was sent (``coordinator.intake``), writes
it durably (``Store.accept``, which refuses a result whose task is closed in
the same transaction), updates the device's status and wakes the engine.
The engine folds each result into the aggregate from its stored record, so
what is in the model is exactly what was acknowledged, also after a restart.

Transport encodings (``heterofl_edge.encoding``): each task states the
download and upload encoding for the device's level, never one the device did
not declare at registration (fp32 instead, said in ``encoding_note``). A
phase's downloads are encoded once per (level, encoding) with a seed of the run,
round and level, so they are the same tensors after a restart; a lossy upload is
an update, added back to the weights its device received when it is folded.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
from safetensors.torch import save

from coordinator.errors import ApiError, ErrorCode
from coordinator.intake import check_update, decode_update, parse_masked, parse_statistics
from coordinator.registry import Device, DeviceRegistry
from coordinator.store import Store, TaskClosed
from heterofl_edge.encoding import (
    Encoding,
    EncodingPlan,
    TransferLog,
    decode_payload,
    download_seed,
    encode_payload,
    upload_seed,
)
from heterofl_edge.engine import (
    Client,
    Phase,
    Reply,
    SecureInput,
    StageReply,
    StageRequest,
    StatsReply,
    Task,
    TrainReply,
)
from heterofl_edge.errors import ConfigError, InternalError
from heterofl_edge.levels import rate_label
from heterofl_edge.models import Architecture
from heterofl_edge.privacy import DpPlacement, PrivacyPlan, noise_shape
from heterofl_edge.protocol import (
    Accepted,
    ArtifactRef,
    DistributedNoise,
    DoneTask,
    Hyperparameters,
    SecAggAnswer,
    SecAggPeer,
    SecAggTask,
    SecureMasking,
    StatisticsTask,
    TaskReply,
    TrainTask,
    WaitTask,
)
from heterofl_edge.secagg import (
    MODULUS_BITS,
    Advertisement,
    FixedPoint,
    SecAggRefusal,
    SharedInt8,
    ShareRequest,
    Stage,
    UnmaskRequest,
    b64,
    check_advertisement,
    check_shares,
    check_unmask,
    statistics_layout,
    unb64,
)
from heterofl_edge.slicing import extract_submodel_state, shapes_at, trainable_names

__all__ = ["DeviceState", "TaskBoard", "TaskStatus", "Waker", "encode_state"]

log = logging.getLogger("heterofl_edge.coordinator")


class TaskStatus(StrEnum):
    assigned = "assigned"  # published, not yet started
    training = "training"  # the device fetched its weights
    uploaded = "uploaded"
    missed = "missed"  # the phase closed without its result


class DeviceState(StrEnum):
    online = "online"
    selected = "selected"
    training = "training"
    late = "late"  # its last task closed before its result arrived
    offline = "offline"


def encode_state(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    return save({k: v.contiguous() for k, v in state.items()}, metadata=dict(metadata))


class Waker:
    """Wakes the engine when something happened; lets a caller wait until it is idle.

    The engine calls ``sleep`` when it has nothing to do; ``poke`` cuts that
    sleep short. ``settle`` pokes and returns once the engine has looked at
    everything that happened before it and is asleep again: tests use it with
    a fake clock instead of sleeping.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._asked = 0
        self._seen = 0
        self._idle = False
        self._closed = False

    def poke(self) -> None:
        with self._cond:
            self._asked += 1
            self._cond.notify_all()

    def sleep(self, timeout: float) -> None:
        with self._cond:
            if self._asked > self._seen or self._closed:
                self._seen = self._asked
                return
            self._idle = True
            self._cond.notify_all()
            self._cond.wait(timeout)
            self._idle = False
            self._seen = self._asked

    def settle(self, timeout: float = 600.0) -> bool:
        with self._cond:
            self._asked += 1
            target = self._asked
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: self._closed or (self._seen >= target and self._idle), timeout
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class TaskEncodings:
    """How one device's task travels: the encodings down and up, and why if not the run's."""

    download: Encoding = Encoding.fp32
    upload: Encoding = Encoding.fp32
    note: str | None = None


WeightsKey = tuple[float, Encoding]  # (rate, download encoding)


@dataclass(frozen=True)
class PhaseView:
    """One published phase: read by request threads without locks."""

    round: int
    phase: Phase
    lr: float
    opened_at: float
    deadline: float
    tasks: Mapping[str, Task]
    weights: Mapping[WeightsKey, bytes]  # safetensors of the sub-model, encoded
    expected_counts: Mapping[str, int] = field(default_factory=dict)  # statistics phase
    transport: Mapping[str, TaskEncodings] = field(default_factory=dict)  # by device
    # The trainable weights a device decoded from each download: lossy uploads add to them.
    received: Mapping[WeightsKey, Mapping[str, np.ndarray]] = field(default_factory=dict)
    secure: Mapping[str, SecureInput] | None = None  # secure aggregation: masked uploads

    def transport_of(self, device_id: str) -> TaskEncodings:
        return self.transport.get(device_id, TaskEncodings())


@dataclass
class StageView:
    """One open secure aggregation stage: its requests and the answers accepted so far.

    Kept in memory only: what a stage holds (public keys, encrypted shares,
    unmasking shares) dies with the process, and the engine abandons a secure
    round it finds open at start-up (nothing is ever unmasked from a partial record).
    """

    round: int
    phase: Phase
    stage: Stage
    context: str  # the instance's (every request names it)
    requests: Mapping[str, StageRequest]
    deadline: float
    answers: dict[str, object] = field(default_factory=dict)
    handed: set[str] = field(default_factory=set)  # answers the engine has read
    keys: set[bytes] = field(default_factory=set)  # every public key advertised
    closed: bool = False


@dataclass(frozen=True)
class TaskSettings:
    """What every training task carries besides its level, lr and seed."""

    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    clip_grad_norm: float | None
    formats: tuple[str, ...]
    poll_seconds: float
    heartbeat_seconds: float  # how often a working device calls /v1/heartbeat


@contextmanager
def storing_result(device_id: str, number: int, what: str) -> Iterator[None]:
    """Store a device's ``what`` of round ``number``; the store's refusals as the device's errors.

    A failed disk or database is a server fault (logged, 503 storage_error); a task
    already uploaded is 409 duplicate_upload, one closed otherwise 409 round_closed.
    """
    try:
        yield
    except sqlite3.Error as exc:
        log.exception("storing a %s of device %s failed", what, device_id)
        raise ApiError(
            ErrorCode.storage_error,
            f"the coordinator could not store your {what} ({type(exc).__name__})",
            "retry later; nothing of it was kept",
        ) from None
    except TaskClosed as closed:
        if closed.status == TaskStatus.uploaded:
            raise ApiError(
                ErrorCode.duplicate_upload, f"round {number}: already received"
            ) from None
        raise ApiError(
            ErrorCode.round_closed,
            f"round {number} closed before your {what} arrived",
            "ask /v1/task for your next task",
        ) from None


class TaskBoard:
    def __init__(
        self,
        store: Store,
        registry: DeviceRegistry,
        arch: Architecture,
        global_rate: float,
        settings: TaskSettings,
        clock: Callable[[], float],
        waker: Waker,
        tick_seconds: float = 0.5,
        on_result: Callable[[str, int], None] = lambda kind, size: None,
        plan: EncodingPlan | None = None,
        run_seed: int = 0,
        on_transfer: Callable[[str, str, str, int], None] = lambda d, k, e, size: None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.arch = arch
        self.global_rate = global_rate
        self.settings = settings
        self.clock = clock
        self.waker = waker
        self.tick_seconds = tick_seconds
        self.on_result = on_result
        self.plan = plan or EncodingPlan()
        self.run_seed = run_seed
        self.on_transfer = on_transfer  # (direction, kind, encoding, bytes) of every payload
        self.transfer = TransferLog()  # bytes per round and device, since start-up
        self._view: PhaseView | None = None
        self._status: dict[str, TaskStatus] = {}
        self._started: dict[str, float] = {}
        self._closed = False
        self._late: set[str] = set()
        self._folded: set[str] = set()
        self._done = False
        self._done_rounds = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # status changes from request threads
        self._shapes_by_rate: dict[float, dict[str, tuple[int, ...]]] = {}
        # A private run's plan (heterofl_edge.privacy), set by the coordinator with its engine:
        # tasks then ask for no labels, metrics or counts, and carry any device-side noise.
        self.privacy: PrivacyPlan | None = None
        self._noise: DistributedNoise | None = None
        # The open secure aggregation stages, by instance context, in the order they opened
        # (a round's training and statistics instances set up their keys side by side).
        self._stages: dict[str, StageView] = {}
        self._check_transport()

    def _transport_key(self) -> str:
        plan = self.plan
        return json.dumps(
            {
                "download": str(plan.download),
                "upload": str(plan.upload),
                "error_feedback": plan.error_feedback,
            },
            sort_keys=True,
        )

    def _check_transport(self) -> None:
        """``ConfigError`` if the open round was opened with other encodings than the run's now.

        Its stored updates are additions to what its devices received: they can only be
        read with the encodings they were sent under. Between rounds, encodings may change.
        """
        row = self.store.open_round_row()
        stored = self.store.get_meta("transport")
        if row is None or stored is None or stored == self._transport_key():
            return
        was = json.loads(stored)
        raise ConfigError(
            f"round {row['number']} was opened with --download-encoding {was['download']} "
            f"--upload-encoding {was['upload']}"
            + (" --error-feedback" if was["error_feedback"] else "")
            + ", not with this run's encodings",
            "restart with those encodings until the round ends, or run 'heterofl-edge "
            "coordinator repair' to discard the open round",
        )

    # -- the engine's side (Transport) -----------------------------------------------
    def wait_for_clients(self, minimum: int) -> list[Client] | None:
        while not self._stop.is_set():
            live = self.registry.live()
            if len(live) >= minimum:
                return [Client(d.id, d.position) for d in live]
            self.waker.sleep(self.tick_seconds)
        return None

    def population(self) -> int:
        return len(self.registry)

    def open_phase(
        self,
        round_number: int,
        phase: Phase,
        tasks: Sequence[Task],
        state: Mapping[str, torch.Tensor],
        deadline: float,
        secure: Mapping[str, SecureInput] | None = None,
    ) -> None:
        offset = tasks[0].offset if tasks else 0  # one round's windows start together
        transport = {t.client: self._transport(t, phase) for t in tasks}
        updated = {
            (t.rate, transport[t.client].download)
            for t in tasks
            if transport[t.client].upload.lossy
        }
        weights: dict[WeightsKey, bytes] = {}
        received: dict[WeightsKey, dict[str, np.ndarray]] = {}
        for rate, encoding in sorted({(t.rate, transport[t.client].download) for t in tasks}):
            sub = extract_submodel_state(state, self.arch.spec, rate, self.global_rate, offset)
            body = encode_payload(
                {k: v.detach().cpu().numpy() for k, v in sub.items()},
                encoding,
                download_seed(self.run_seed, round_number, rate, phase.value),
                {"round": str(round_number), "rate": repr(rate)},
            )
            weights[(rate, encoding)] = body
            if (rate, encoding) in updated:  # a lossy upload is added back to these
                decoded = decode_payload(body).arrays
                names = trainable_names(self.arch.spec)
                received[(rate, encoding)] = {n: decoded[n] for n in names}
        if phase is Phase.training and self.store.get_meta("transport") != self._transport_key():
            self.store.set_meta("transport", self._transport_key())  # what the round is sent in
        rows = {r.device_id: r for r in self.store.tasks(round_number)}
        status = {
            t.client: TaskStatus(rows[t.client].status)
            if t.client in rows and rows[t.client].phase is phase
            else TaskStatus.assigned
            for t in tasks
        }
        expected: dict[str, int] = {}
        if phase is Phase.statistics:
            expected = self._expected_counts(round_number, tasks)
        noise = self._distributed_noise(tasks) if phase is Phase.training else None
        closed = (self.store.round_state(round_number) or "").endswith("-closed")
        with self._lock:
            self._noise = noise
            self._status = status
            self._started = {}
            self._folded = set()
            self._closed = closed
            self._late -= set(status)
            self._view = PhaseView(
                round_number,
                phase,
                tasks[0].lr if tasks else 0.0,
                self.clock(),
                deadline,
                {t.client: t for t in tasks},
                weights,
                expected,
                transport,
                received,
                secure,
            )

    def _transport(self, task: Task, phase: Phase) -> TaskEncodings:
        """The encodings of ``task``: the run's for its level, where its device declared them."""
        device = self.registry.get(task.client)
        declared = device.profile.get("encodings") if device is not None else None
        down, up, note = self.plan.choose(task.rate, declared)
        if phase is Phase.statistics:
            up = Encoding.fp32  # sBN moments are small, and travel as float32
        return TaskEncodings(down, up, note)

    def _expected_counts(self, round_number: int, tasks: Sequence[Task]) -> dict[str, int]:
        """The examples each device summarises in a statistics phase.

        What it trained on this round, else what its profile says it holds
        (``--statistics all``); a device with neither cannot answer.
        """
        if self.privacy is not None:  # each report weighs as one client: no count released
            return {task.client: 1 for task in tasks}
        trained = {r.device_id: r for r in self.store.tasks(round_number, Phase.training)}
        counts = {}
        for task in tasks:
            row = trained.get(task.client)
            if row is not None and row.num_samples:
                counts[task.client] = int(row.num_samples)
                continue
            device = self.registry.get(task.client)
            held = device.profile.get("num_examples") if device is not None else None
            if isinstance(held, int) and held > 0:
                counts[task.client] = held
        return counts

    def _distributed_noise(self, tasks: Sequence[Task]) -> DistributedNoise | None:
        """The noise devices add themselves this round (distributed placement), else None."""
        plan = self.privacy
        if plan is None or plan.placement is not DpPlacement.distributed:
            return None
        rates = [t.rate for t in tasks]
        shape = noise_shape(self.arch.spec, rates)
        assert plan.noise_multiplier is not None  # solved when the round was admitted
        return DistributedNoise(
            clip=plan.clip,
            noise_multiplier=plan.noise_multiplier,
            reporting_fraction=plan.reporting_fraction,
            round_rates=rates,
            sizes=shape.sizes,
            blocks=shape.blocks,
        )

    def replies(self, round_number: int, phase: Phase) -> Iterator[Reply | None]:
        while True:
            found = self._pending(round_number, phase)
            yield from found
            yield None
            if not found:
                self.waker.sleep(self.tick_seconds)

    def all_silent(self, clients: Sequence[str]) -> bool:
        now = self.clock()
        for client in clients:
            device = self.registry.get(client)
            if not (
                device is None
                or self.registry.is_silent(device, now)
                or self._status.get(client) is TaskStatus.missed
            ):
                return False
        return True

    def close_phase(self, round_number: int, phase: Phase) -> list[Reply]:
        self.store.close_phase(round_number, phase)
        with self._lock:
            self._closed = True
            for client, status in list(self._status.items()):
                if status in (TaskStatus.assigned, TaskStatus.training):
                    self._status[client] = TaskStatus.missed
                    self._late.add(client)
        return self._pending(round_number, phase)

    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()
        self.waker.poke()

    def finish(self, rounds: int) -> None:
        """Every round has run: devices are told they are done."""
        self._done_rounds = rounds
        self._done = True

    # -- secure aggregation stages (the engine's SecureTransport side) -----------------------
    def open_stage(
        self,
        round_number: int,
        phase: Phase,
        stage: Stage,
        requests: Mapping[str, StageRequest],
        deadline: float,
    ) -> None:
        contexts = {request.context for request in requests.values()}
        if len(contexts) > 1:
            raise InternalError(f"one stage's requests name {len(contexts)} instances")
        if not contexts:
            return  # nobody to ask
        (context,) = contexts
        view = StageView(round_number, phase, stage, context, dict(requests), deadline)
        with self._lock:  # a new dict: request threads read the old one without the lock
            stages = {c: v for c, v in self._stages.items() if not v.closed}
            stages[context] = view
            self._stages = stages
        self.waker.poke()

    def stage_replies(self, round_number: int) -> Iterator[StageReply | None]:
        while True:
            found = self._stage_pending()
            yield from found
            yield None
            if not found:
                self.waker.sleep(self.tick_seconds)

    def close_stages(self, round_number: int) -> list[StageReply]:
        with self._lock:
            for view in self._stages.values():
                view.closed = True
        return self._stage_pending()

    def _stage_pending(self) -> list[StageReply]:
        found = []
        with self._lock:
            for view in self._stages.values():
                new = [c for c in view.answers if c not in view.handed]
                view.handed.update(new)
                found += [StageReply(view.context, c, view.answers[c]) for c in new]
        return found

    def _masked_shape(self, view: PhaseView, device_id: str) -> tuple[int, int]:
        """A device's masked vector: its length and the bits of its modulus."""
        assert view.secure is not None
        secure = view.secure[device_id]
        if secure.plan is not None:
            return secure.plan.layout(view.tasks[device_id].rate).size, secure.modulus_bits
        return statistics_layout(secure.layers).size, secure.modulus_bits

    def _pending(self, round_number: int, phase: Phase) -> list[Reply]:
        found: list[Reply] = []
        for row in self.store.uploaded(round_number, phase, skip=self._folded):
            self._folded.add(row.device_id)
            payload = self.store.payload(round_number, phase, row.device_id)
            if payload is None:
                continue
            view = self._view
            if view is not None and view.secure is not None:
                secure = view.secure.get(row.device_id)
                if secure is None:
                    continue
                masked = parse_masked(payload, *self._masked_shape(view, row.device_id))
                found.append(
                    TrainReply(row.device_id, {}, None, 0, {}, row.seconds, True, masked)
                    if phase is Phase.training
                    else StatsReply(row.device_id, {}, masked)
                )
                continue
            if phase is Phase.training:
                tensors = self._weights_of(row.device_id, payload)
                found.append(
                    TrainReply(
                        row.device_id,
                        tensors,
                        row.labels,
                        int(row.num_samples or 0),
                        row.metrics or {},
                        row.seconds,
                        # Checked on the request path before it was stored (and again at
                        # start-up, where a damaged record could come from): trusted here.
                        checked=True,
                    )
                )
            else:
                view = self._view
                expected = view.expected_counts.get(row.device_id, 0) if view else 0
                moments = parse_statistics(payload, self.bn_widths(), expected)
                found.append(StatsReply(row.device_id, moments))
        return found

    def _weights_of(self, device_id: str, payload: bytes) -> dict[str, torch.Tensor]:
        """The weights a stored training upload stands for (an update is added back)."""
        view = self._view
        if view is None:
            raise InternalError("a training upload is read back without a published phase")
        task, carried = view.tasks[device_id], view.transport_of(device_id)
        received = view.received.get((task.rate, carried.download))
        arrays = decode_update(payload, carried.upload, received)
        return {name: torch.from_numpy(np.array(a, np.float32)) for name, a in arrays.items()}

    def _shapes(self, rate: float) -> dict[str, tuple[int, ...]]:
        shapes = self._shapes_by_rate.get(rate)
        if shapes is None:
            shapes = self._shapes_by_rate[rate] = shapes_at(self.arch.spec, rate)
        return shapes

    @functools.cached_property
    def _bn_widths(self) -> dict[str, int]:
        from coordinator.bootstrap import sbn_widths

        return sbn_widths(self.arch, self.global_rate)

    def bn_widths(self) -> dict[str, int]:
        """Channels of every sBN layer in the global model."""
        return dict(self._bn_widths)

    # -- the devices' side (request threads) -------------------------------------------
    def task_for(self, device: Device) -> TaskReply:
        for stage in list(self._stages.values()):
            if not stage.closed and device.id in stage.requests and device.id not in stage.answers:
                return self._stage_task(stage, stage.requests[device.id])
        view = self._view
        if view is not None and not self._closed and device.id in view.tasks:
            status = self._status.get(device.id)
            if status in (TaskStatus.assigned, TaskStatus.training):
                return self._task(view, view.tasks[device.id])
        if self._done:
            return DoneTask(rounds=self._done_rounds)
        return WaitTask(retry_after=self._wait_seconds(device))

    def _wait_seconds(self, device: Device) -> float:
        """How long a device with nothing to do waits before asking again.

        The poll interval; shorter while a secure aggregation stage it answered waits
        for the other devices' answers, because the next stage (or the phase) opens the
        moment the last one comes. The stage's devices then ask at most about
        ``_STAGE_ASKS_PER_SECOND`` times a second in all.
        """
        poll = self.settings.poll_seconds
        for stage in list(self._stages.values()):
            if not stage.closed and device.id in stage.answers:
                share = len(stage.requests) / _STAGE_ASKS_PER_SECOND
                return min(poll, max(_STAGE_POLL_SECONDS, share))
        return poll

    def _task(self, view: PhaseView, task: Task) -> TrainTask | StatisticsTask:
        number, level = view.round, rate_label(task.rate)
        work = {
            "round": number,
            "level": level,
            "rate": task.rate,
            "artifact": ArtifactRef(
                model=self.arch.name,
                level=level,
                manifest_url=f"/v1/artifacts/{self.arch.name}/{level}/manifest.json",
                formats=list(self.settings.formats),
            ),
            "weights_url": f"/v1/rounds/{number}/weights",
            "deadline": view.deadline,
            "heartbeat_seconds": self.settings.heartbeat_seconds,
        }
        private = self.privacy is not None
        secure = None if view.secure is None else _masking(view.secure[task.client])
        carried = view.transport_of(task.client)
        work["download_encoding"] = carried.download
        work["encoding_note"] = carried.note
        if view.phase is Phase.statistics:
            return StatisticsTask(
                **work,
                upload_url=f"/v1/rounds/{number}/statistics",
                expected_count=view.expected_counts.get(task.client),
                private=private,
                secure=secure,
            )
        s = self.settings
        return TrainTask(
            **work,
            seed=task.seed,
            lr=task.lr,
            hyperparameters=Hyperparameters(
                epochs=s.epochs,
                batch_size=s.batch_size,
                momentum=s.momentum,
                weight_decay=s.weight_decay,
                clip_grad_norm=s.clip_grad_norm,
            ),
            upload_url=f"/v1/rounds/{number}/update",
            private=private,
            distributed_noise=self._noise,
            secure=secure,
            upload_encoding=carried.upload,
            rounding_seed=upload_seed(task.seed),
            error_feedback=self.plan.error_feedback and carried.upload.lossy,
        )

    def _stage_task(self, stage: StageView, request: StageRequest) -> SecAggTask:
        body = request.body
        extra: dict[str, object] = {}
        if isinstance(body, ShareRequest):
            extra["threshold"] = body.threshold
            extra["neighbours"] = [
                SecAggPeer(index=v, c_public=b64(a.c_public), s_public=b64(a.s_public))
                for v, a in body.neighbours.items()
            ]
        elif isinstance(body, UnmaskRequest):
            extra["dropped"], extra["survivors"] = list(body.dropped), list(body.survivors)
        return SecAggTask(
            round=stage.round,
            phase=stage.phase.value,
            stage=stage.stage.value,
            context=request.context,
            index=request.index,
            answer_url=f"/v1/rounds/{stage.round}/secagg",
            deadline=stage.deadline,
            heartbeat_seconds=self.settings.heartbeat_seconds,
            **extra,
        )

    def accept_secagg(self, device: Device, number: int, answer: SecAggAnswer) -> Accepted:
        """Check a stage answer and keep it for the engine; refused with a code otherwise."""
        open_now = [v for v in list(self._stages.values()) if v.round == number and not v.closed]
        if not open_now:
            raise ApiError(
                ErrorCode.round_closed,
                f"round {number} takes no secure aggregation answer now",
                "ask /v1/task for your next task",
            )
        if not any(device.id in v.requests for v in open_now):
            raise ApiError(
                ErrorCode.not_assigned,
                f"device {device.id} takes no part in this aggregation",
                "ask /v1/task what to do",
            )
        stage = next((v for v in open_now if v.context == answer.context), None)
        request = None if stage is None else stage.requests.get(device.id)
        if stage is None or request is None or answer.stage != stage.stage.value:
            raise ApiError(
                ErrorCode.round_closed,
                "this answer is for another aggregation or stage",
                "ask /v1/task for your next task",
            )
        with self._lock:  # other request threads add keys under it
            seen_keys = set().union(*(v.keys for v in open_now))
        try:
            value = _checked_answer(stage, request, device.id, answer, seen_keys)
        except SecAggRefusal as refusal:
            raise ApiError(ErrorCode(refusal.code), refusal.message, refusal.hint) from None
        with self._lock:
            if stage.closed:  # closed while the answer was checked: the engine has moved on
                raise ApiError(
                    ErrorCode.round_closed,
                    f"round {number} takes no secure aggregation answer now",
                    "ask /v1/task for your next task",
                )
            if device.id in stage.answers:  # a second answer raced the first
                raise ApiError(_DUPLICATE[stage.stage], "this stage was answered already")
            if isinstance(value, Advertisement):
                keys = {value.c_public, value.s_public}
                if any(keys & v.keys for v in self._stages.values()):  # raced another answer
                    raise ApiError(
                        ErrorCode.replayed_key,
                        "a public key that was advertised before: keys are fresh every round",
                    )
                stage.keys |= keys
            stage.answers[device.id] = value
        self.waker.poke()
        return Accepted(accepted=True, round=number)

    def _open_task(
        self, device: Device, number: int, phase: Phase | None
    ) -> tuple[PhaseView, Task]:
        """The device's open task in round ``number`` (and ``phase``), or the error to send."""
        view = self._view
        if view is None or number > view.round:
            raise ApiError(
                ErrorCode.unknown_round, f"round {number} has not started", "ask /v1/task"
            )
        if number < view.round or (phase is not None and phase is not view.phase):
            raise ApiError(
                ErrorCode.round_closed,
                f"round {number} no longer takes this",
                "ask /v1/task for your next task",
            )
        task = view.tasks.get(device.id)
        if task is None:
            raise ApiError(
                ErrorCode.not_assigned,
                f"device {device.id} has no task in round {number}",
                "ask /v1/task what to do",
            )
        status = self._status.get(device.id)
        if status is TaskStatus.uploaded:
            raise ApiError(
                ErrorCode.duplicate_upload,
                f"round {number}: your result was already received",
                "ask /v1/task for your next task",
            )
        if status is TaskStatus.missed or self._closed:
            raise ApiError(
                ErrorCode.round_closed,
                f"round {number} closed before your result arrived",
                "ask /v1/task for your next task",
            )
        return view, task

    def weights_for(self, device: Device, number: int) -> bytes:
        view, task = self._open_task(device, number, None)
        with self._lock:
            self._started.setdefault(device.id, self.clock())
            if self._status.get(device.id) is TaskStatus.assigned:
                self._status[device.id] = TaskStatus.training
        encoding = view.transport_of(device.id).download
        body = view.weights[(task.rate, encoding)]
        self._count(view, device.id, "down", encoding, len(body))
        return body

    def _count(
        self, view: PhaseView, device_id: str, direction: str, encoding: Encoding, size: int
    ) -> None:
        kind = "train" if view.phase is Phase.training else "statistics"
        self.transfer.add(view.round, direction, kind, encoding.value, size, device_id)
        self.on_transfer(direction, kind, encoding.value, size)

    def accept_update(self, device: Device, number: int, body: bytes) -> Accepted:
        view, task = self._open_task(device, number, Phase.training)
        if view.secure is not None:
            return self._accept_masked(device, view, number, body, "update")
        carried = view.transport_of(device.id)
        parsed = check_update(
            body,
            self.arch.spec,
            task.rate,
            self.arch.num_classes,
            shapes=self._shapes(task.rate),
            private=self.privacy is not None,
            encoding=carried.upload,
            received=view.received.get((task.rate, carried.download)),
        )
        now = self.clock()
        started = self._started.get(device.id, view.opened_at)
        self._store_result(
            device,
            view,
            body,
            now,
            now - started,
            parsed.num_samples,
            parsed.labels,
            None if self.privacy is not None else parsed.metrics,  # a private run keeps none
        )
        self.on_result("update", len(body))
        self._count(view, device.id, "up", carried.upload, len(body))
        return Accepted(accepted=True, round=number)

    def _accept_masked(
        self, device: Device, view: PhaseView, number: int, body: bytes, kind: str
    ) -> Accepted:
        """A masked vector of the device's layout, stored as sent (uniform mod its modulus)."""
        length, bits = self._masked_shape(view, device.id)
        parse_masked(body, length, bits)
        now = self.clock()
        started = self._started.get(device.id, view.opened_at)
        self._store_result(device, view, body, now, now - started, None, None, None)
        self.on_result(kind, len(body))
        encoding = Encoding.int8 if bits < MODULUS_BITS else Encoding.fp32
        self._count(view, device.id, "up", encoding, len(body))
        return Accepted(accepted=True, round=number)

    def accept_statistics(self, device: Device, number: int, body: bytes) -> Accepted:
        view, _ = self._open_task(device, number, Phase.statistics)
        if view.secure is not None:
            return self._accept_masked(device, view, number, body, "statistics")
        expected = view.expected_counts.get(device.id)
        if expected is None:
            raise ApiError(
                ErrorCode.bad_statistics,
                "the coordinator does not know how many examples this device holds",
                "register with num_examples in the profile to answer statistics queries",
            )
        parse_statistics(body, self.bn_widths(), expected)
        self._store_result(device, view, body, self.clock(), None, None, None, None)
        self.on_result("statistics", len(body))
        self._count(view, device.id, "up", Encoding.fp32, len(body))
        return Accepted(accepted=True, round=number)

    def _store_result(
        self,
        device: Device,
        view: PhaseView,
        body: bytes,
        now: float,
        seconds: float | None,
        num_samples: int | None,
        labels: Sequence[int] | None,
        metrics: dict[str, float] | None,
    ) -> None:
        with storing_result(device.id, view.round, "result"):
            self.store.accept(
                view.round, view.phase, device.id, body, now, seconds, num_samples, labels, metrics
            )
        with self._lock:
            self._status[device.id] = TaskStatus.uploaded
            self._late.discard(device.id)
        self.waker.poke()

    # -- reading ---------------------------------------------------------------------------
    def view(self) -> PhaseView | None:
        return self._view

    def phase_closed(self) -> bool:
        return self._closed

    def status_of(self, device_id: str) -> TaskStatus | None:
        return self._status.get(device_id)

    def device_state(self, device: Device, now: float) -> DeviceState:
        if self.registry.is_silent(device, now):
            return DeviceState.offline
        view = self._view
        if view is not None and not self._closed and device.id in view.tasks:
            status = self._status.get(device.id)
            if status is TaskStatus.assigned:
                return DeviceState.selected
            if status is TaskStatus.training:
                return DeviceState.training
        if device.id in self._late:
            return DeviceState.late
        return DeviceState.online


# A device that answered a secure aggregation stage asks again after this long while the
# stage waits for the others (at most the poll interval), and the stage's devices at most
# about this many times a second in all (a large stage's devices wait longer).
_STAGE_POLL_SECONDS = 0.25
_STAGE_ASKS_PER_SECOND = 400.0

_DUPLICATE = {
    Stage.advertise: ErrorCode.duplicate_advertisement,
    Stage.share: ErrorCode.duplicate_upload,
    Stage.unmask: ErrorCode.duplicate_unmask,
}


def _index(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise SecAggRefusal(f"{text[:20]!r} is not a client index", code="unknown_peer")
    return int(text)


def _checked_answer(
    stage: StageView,
    request: StageRequest,
    device_id: str,
    answer: SecAggAnswer,
    seen_keys: set[bytes],
) -> object:
    """The answer as the engine takes it, checked against the stage's request.

    ``seen_keys``: every public key advertised to the open stages (of any instance).
    """
    if device_id in stage.answers:
        raise SecAggRefusal("this stage was answered already", code=_DUPLICATE[stage.stage].value)
    if stage.stage is Stage.advertise:
        if answer.c_public is None or answer.s_public is None:
            raise SecAggRefusal("an advertisement holds c_public and s_public", code="bad_key")
        advertisement = Advertisement(
            unb64(answer.c_public, "c_public"), unb64(answer.s_public, "s_public")
        )
        try:
            check_advertisement(advertisement)
        except SecAggRefusal as refusal:
            raise SecAggRefusal(refusal.message, code="bad_key") from None
        if {advertisement.c_public, advertisement.s_public} & seen_keys:
            raise SecAggRefusal(
                "a public key that was advertised before: keys are fresh every round",
                code="replayed_key",
            )
        return advertisement
    if stage.stage is Stage.share:
        assert isinstance(request.body, ShareRequest)
        shares = {_index(k): unb64(v, "a share") for k, v in (answer.shares or {}).items()}
        check_shares(sorted(request.body.neighbours), shares)
        return shares
    assert isinstance(request.body, UnmaskRequest)
    values: dict[int, int] = {}
    for key, text in (answer.unmask or {}).items():
        if not text.isdigit() or len(text) > 200:
            raise SecAggRefusal("a share is a decimal integer", code="bad_share")
        values[_index(key)] = int(text)
    check_unmask(request.body, values)
    return values


def _masking(secure: SecureInput) -> SecureMasking:
    """What a device needs to encode and mask its upload."""
    request, fixed = secure.request, secure.fixed
    return SecureMasking(
        context=secure.context,
        index=secure.index,
        peers={str(v): secure.rates.get(v, 0.0) for v in request.peers},
        ciphertexts={str(v): b64(blob) for v, blob in request.ciphertexts.items()},
        encoding="int8" if isinstance(fixed, SharedInt8) else "fixed_point",
        scale=fixed.scale if isinstance(fixed, FixedPoint) else None,
        clip=None if fixed is None else fixed.clip,
        modulus_bits=secure.modulus_bits,
        plan=None if secure.plan is None else secure.plan.to_json(),
        layers=list(secure.layers),
        statistics_scale=secure.statistics_scale or None,
    )
