"""The task board for buffered aggregation: every device on its own task, from its own version.

``BufferedBoard`` is the ``TaskBoard`` (its statistics phase, its device and
request plumbing) with the buffered engine's transport on top
(``heterofl_edge.buffered_engine.BufferedTransport``). A device holds at most
one training task, which starts from a model version: ``GET /v1/task`` gives a
``TrainTask`` whose ``round`` is that version plus one (the version it trains
toward, as a synchronous round r starts from the model after round r - 1), and
its ``weights_url`` and ``upload_url`` name it (``/v1/rounds/{round}/...``), so
the Python device, the browser and ExecuTorch devices need nothing new.

An upload is checked (``coordinator.intake``), refused with ``409
stale_update`` when its version is more than ``max_staleness`` versions
behind the newest one, else stored with its fold position and acknowledged
(``BufferedRecords.accept``: the 2xx comes after the commit). The engine
reads acknowledged updates back in that order (``arrivals``), from their
stored records, also after a restart.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from coordinator.board import (
    DeviceState,
    PhaseView,
    TaskBoard,
    TaskStatus,
    encode_state,
    storing_result,
)
from coordinator.buffered_journal import BufferedRecords
from coordinator.errors import ApiError, ErrorCode
from coordinator.intake import check_update, decode_payload
from coordinator.registry import Device
from heterofl_edge.buffered_engine import Arrival, Event, Lost, VersionTask
from heterofl_edge.engine import Phase, Task, TrainReply
from heterofl_edge.protocol import Accepted, DoneTask, TaskReply, WaitTask
from heterofl_edge.slicing import Submodel, extract_submodel_state

__all__ = ["BufferedBoard"]

log = logging.getLogger("heterofl_edge.coordinator")

State = dict[str, torch.Tensor]


class BufferedBoard(TaskBoard):
    """The buffered engine's transport over HTTP (see the module docstring)."""

    def __init__(
        self,
        *args: Any,
        records: BufferedRecords,
        max_staleness: int,
        task_seconds: float,
        submodel: Submodel = Submodel.static,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.records = records
        self.max_staleness = max_staleness
        self.task_seconds = task_seconds  # a task's deadline, as devices are told
        self._published = records.published_version()
        self._flights: dict[str, VersionTask] = {}
        self._flight_status: dict[str, TaskStatus] = {}
        self._flight_started: dict[str, float] = {}
        self._encoded: dict[tuple[int, float, int], bytes] = {}
        self._states: dict[int, State] = {}
        self._losses: deque[Event] = deque()
        self._flight_lock = threading.Lock()
        now = self.clock()
        for row in records.open_tasks(records.consumed()):  # out, or acknowledged, not folded
            task = Task(
                row.device_id, row.position, row.rate, row.lr, row.seed, submodel.offset(row.round)
            )
            self._flights[row.device_id] = VersionTask(task, row.round - 1, now)
            self._flight_status[row.device_id] = TaskStatus(row.status)

    # -- the engine's side (BufferedTransport) -------------------------------------------
    def dispatch(self, tasks: Sequence[VersionTask], state: State) -> None:
        for task in tasks:
            self._states.setdefault(task.version, state)
            self._weights(task)  # encoded now, off the request path
        with self._flight_lock:
            for task in tasks:
                self._flights[task.client] = task
                self._flight_status[task.client] = TaskStatus.assigned
                self._flight_started.pop(task.client, None)
                self._late.discard(task.client)

    def arrivals(self, after: int) -> Iterator[Event | None]:
        """Acknowledged updates after fold position ``after`` in ``seq`` order, then losses."""
        seen = after
        while True:
            found = self.records.arrivals_after(seen)
            for seq, row in found:
                seen = seq
                payload = self.store.payload(row.round, Phase.training, row.device_id)
                if payload is None:
                    continue
                tensors, _ = decode_payload(payload)
                reply = TrainReply(
                    row.device_id,
                    tensors,
                    row.labels,
                    int(row.num_samples or 0),
                    row.metrics or {},
                    row.seconds,
                    checked=True,  # checked on the request path before it was stored
                )
                yield Arrival(seq, row.round - 1, reply)
            while self._losses:
                yield self._losses.popleft()
            yield None
            if not found:
                self.waker.sleep(self.tick_seconds)

    def published(self, version: int) -> None:
        self._published = version
        oldest = version - self.max_staleness
        with self._flight_lock:
            for key in [k for k in self._encoded if k[0] < oldest]:
                del self._encoded[key]
            for number in [v for v in self._states if v < oldest]:
                del self._states[number]

    def release(self, tasks: Sequence[VersionTask]) -> None:
        self.records.refuse(tasks, TaskStatus.missed.value)
        with self._flight_lock:
            for task in tasks:
                flight = self._flights.get(task.client)
                if flight is not None and flight.version == task.version:
                    self._flight_status[task.client] = TaskStatus.missed
                    self._late.add(task.client)

    def idle(self) -> None:
        self.waker.sleep(self.tick_seconds)

    def _weights(self, task: VersionTask) -> bytes:
        key = (task.version, task.task.rate, task.task.offset)
        encoded = self._encoded.get(key)
        if encoded is None:
            state = self._states.get(task.version)
            if state is None:
                state = self._states[task.version] = self.records.version_state(task.version)
            sub = extract_submodel_state(
                state, self.arch.spec, task.task.rate, self.global_rate, task.task.offset
            )
            metadata = {"round": str(task.version + 1), "rate": repr(task.task.rate)}
            encoded = self._encoded[key] = encode_state(sub, metadata)
        return encoded

    # -- the devices' side (request threads) -------------------------------------------
    def _statistics_open_for(self, device: Device) -> bool:
        view = self._view
        return (
            view is not None
            and view.phase is Phase.statistics
            and not self._closed
            and device.id in view.tasks
            and self._status.get(device.id) in (TaskStatus.assigned, TaskStatus.training)
        )

    def task_for(self, device: Device) -> TaskReply:
        if self._statistics_open_for(device):
            return super().task_for(device)
        if self._done:
            return DoneTask(rounds=self._done_rounds)
        flight = self._flights.get(device.id)
        status = self._flight_status.get(device.id)
        if flight is not None and status in (TaskStatus.assigned, TaskStatus.training):
            view = PhaseView(
                flight.version + 1,
                Phase.training,
                flight.task.lr,
                flight.dispatched_at,
                flight.dispatched_at + self.task_seconds,
                {},
                {},
            )
            return self._task(view, flight.task)
        return WaitTask(retry_after=self.settings.poll_seconds)

    def _flight(self, device: Device, number: int) -> VersionTask:
        """The device's open training task of round ``number``, or the error to send."""
        if number - 1 > self._published:
            raise ApiError(
                ErrorCode.unknown_round, f"version {number - 1} is not published", "ask /v1/task"
            )
        flight = self._flights.get(device.id)
        if flight is None or flight.version + 1 != number:
            if self._published - (number - 1) > self.max_staleness:
                raise self._stale(number)
            raise ApiError(
                ErrorCode.not_assigned,
                f"device {device.id} has no task of round {number}",
                "ask /v1/task what to do",
            )
        status = self._flight_status.get(device.id)
        if status is TaskStatus.uploaded:
            raise ApiError(
                ErrorCode.duplicate_upload,
                f"round {number}: your update was already received",
                "ask /v1/task for your next task",
            )
        if status not in (TaskStatus.assigned, TaskStatus.training):
            raise ApiError(
                ErrorCode.round_closed,
                f"your task of round {number} was given up on",
                "ask /v1/task for your next task",
            )
        return flight

    def _stale(self, number: int) -> ApiError:
        behind = self._published - (number - 1)
        return ApiError(
            ErrorCode.stale_update,
            f"round {number} started from version {number - 1}, {behind} versions behind the "
            f"newest ({self._published}); updates more than {self.max_staleness} behind are "
            "refused",
            "ask /v1/task for your next task (it starts from the newest version)",
        )

    def weights_for(self, device: Device, number: int) -> bytes:
        view = self._view
        if view is not None and view.round == number and self._statistics_open_for(device):
            return super().weights_for(device, number)
        flight = self._flight(device, number)
        with self._flight_lock:
            self._flight_started.setdefault(device.id, self.clock())
            if self._flight_status.get(device.id) is TaskStatus.assigned:
                self._flight_status[device.id] = TaskStatus.training
        return self._weights(flight)

    def accept_update(self, device: Device, number: int, body: bytes) -> Accepted:
        flight = self._flight(device, number)
        if self._published - flight.version > self.max_staleness:
            self.records.refuse([flight], "stale")
            with self._flight_lock:
                if self._flights.get(device.id) is flight:
                    self._flight_status[device.id] = TaskStatus.missed
            self._losses.append(Lost(device.id, flight.version, "stale"))
            self.waker.poke()
            raise self._stale(number)
        parsed = check_update(
            body,
            self.arch.spec,
            flight.task.rate,
            self.arch.num_classes,
            shapes=self._shapes(flight.task.rate),
        )
        now = self.clock()
        started = self._flight_started.get(device.id, flight.dispatched_at)
        with storing_result(device.id, number, "update"):
            seq = self.records.accept(
                number,
                device.id,
                body,
                now,
                now - started,
                parsed.num_samples,
                parsed.labels,
                parsed.metrics,
            )
        with self._flight_lock:
            if self._flights.get(device.id) is flight:
                self._flight_status[device.id] = TaskStatus.uploaded
        self.waker.poke()
        self.on_result("update", len(body))
        log.info(
            "update %d acknowledged: device %s, rate %g, from version %d (newest %d)",
            seq,
            device.id,
            flight.task.rate,
            flight.version,
            self._published,
            extra={"device": device.id, "round": number},
        )
        return Accepted(accepted=True, round=number)

    # -- reading ---------------------------------------------------------------------------
    def status_of(self, device_id: str) -> TaskStatus | None:
        status = self._flight_status.get(device_id)
        return status if status is not None else super().status_of(device_id)

    def device_state(self, device: Device, now: float) -> DeviceState:
        if self.registry.is_silent(device, now):
            return DeviceState.offline
        if self._statistics_open_for(device):
            return super().device_state(device, now)
        status = self._flight_status.get(device.id)
        if status is TaskStatus.assigned:
            return DeviceState.selected
        if status is TaskStatus.training:
            return DeviceState.training
        if device.id in self._late:
            return DeviceState.late
        return DeviceState.online

    def flights(self) -> Mapping[str, VersionTask]:
        """Every device's current training task (read only)."""
        return dict(self._flights)
