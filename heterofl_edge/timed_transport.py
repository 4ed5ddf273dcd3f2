"""The in-process transport on a simulated clock, for both round engines.

``TimedTransport`` is the simulation's ``SessionTransport`` with a
``TimeModel`` (``heterofl_edge.simulated_time``): every client session takes
the simulated time the profile policy's step-time model gives its device and
level, and only clients online at that moment can be reached. A client that
goes offline during a session delivers nothing; the engine notices it
``silent_seconds`` later (the coordinator's device timeout). The clock is the
transport's own (``clock``), so the engines' deadlines, round lengths and
version times are simulated seconds.

* Synchronous rounds: the sessions that finish before the deadline are
  trained (on the backend, all at once) and delivered in the order of their
  simulated finishing times; the round closes when everyone selected has
  answered or gone silent, or at the deadline (stragglers miss it).
* Buffered versions (``BufferedTransport``): a task's session starts on the
  backend as soon as it is dispatched; updates and losses come out in
  simulated-time order (ties: dispatch order), whatever order the workers
  finish in.

The model is therefore the same bits for any number of workers. Without a
time model (a buffered run without ``--simulated-time``) every session takes
one simulated second and every client is always online: updates are folded in
dispatch order. Statistics and evaluation take no simulated time.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from heterofl_edge.backends import SessionBackend
from heterofl_edge.buffered_engine import Arrival, Event, Lost, VersionTask
from heterofl_edge.encoding import EncodingPlan
from heterofl_edge.engine import Client, Phase, SecureInput, StatsReply, Task, TrainReply
from heterofl_edge.errors import InternalError
from heterofl_edge.in_process import SessionTransport
from heterofl_edge.models import Architecture
from heterofl_edge.partition import Partition
from heterofl_edge.sessions import TrainOutcome, to_tensors
from heterofl_edge.simulated_time import TimeModel
from heterofl_edge.training import LocalTrainingConfig

__all__ = ["TimedTransport"]

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Scheduled:
    """A session that will finish (``outcome`` pending on the backend) or be lost."""

    task: Task
    version: int
    seconds: float  # the session's simulated length
    outcome: Iterator[TrainOutcome] | None  # None: the client goes offline first


class TimedTransport(SessionTransport):
    """Client sessions on a simulated clock (see the module docstring)."""

    def __init__(
        self,
        arch: Architecture,
        global_rate: float,
        backend: SessionBackend,
        parts: Partition,
        num_classes: int,
        local: LocalTrainingConfig,
        on_client: Callable[[int, int], None] | None,
        model: TimeModel | None,
        plan: EncodingPlan | None = None,
        run_seed: int = 0,
    ) -> None:
        super().__init__(
            arch, global_rate, backend, parts, num_classes, local, on_client, plan, run_seed
        )
        self.model = model
        self.now = 0.0
        self._silent_after = model.fleet.silent_seconds if model is not None else 0.0
        self._silent: set[str] = set()
        self._events: list[tuple[float, int, _Scheduled]] = []  # a heap: (time, order, session)
        self._order = itertools.count()
        self._released: set[tuple[str, int]] = set()

    def clock(self) -> float:
        """The simulated time, in seconds from the start of the run."""
        return self.now

    # -- who is there ---------------------------------------------------------------
    def _online(self, position: int) -> bool:
        return self.model is None or self.model.online(position, self.now)

    def _session(self, task: Task) -> tuple[float, float]:
        """(the session's length, when the client's online spell ends) from now."""
        if self.model is None:
            return 1.0, math.inf
        seconds = self.model.session_seconds(task.position, task.rate)
        return seconds, self.model.online_until(task.position, self.now)

    def wait_for_clients(self, minimum: int) -> list[Client]:
        """The clients online now; the clock moves on until at least ``minimum`` are."""
        while True:
            online = [Client(str(i), i) for i in range(self.parts.num_clients) if self._online(i)]
            if len(online) >= minimum:
                return online
            self._advance_to_arrival()

    def _advance_to_arrival(self) -> None:
        coming = math.inf if self.model is None else self.model.next_arrival(self.now)
        if not math.isfinite(coming):
            raise InternalError("no simulated client will ever come online to continue the run")
        self.now = coming

    def all_silent(self, clients: Sequence[str]) -> bool:
        return all(c in self._silent for c in clients)

    # -- synchronous rounds ---------------------------------------------------------
    def open_phase(
        self,
        round_number: int,
        phase: Phase,
        tasks: Sequence[Task],
        state: dict[str, torch.Tensor],
        deadline: float,
        secure: Mapping[str, SecureInput] | None = None,
    ) -> None:
        super().open_phase(round_number, phase, tasks, state, deadline, secure)
        self._deadline = deadline
        self._silent = set()

    def replies(self, round_number: int, phase: Phase) -> Iterator[TrainReply | StatsReply | None]:
        if phase is Phase.statistics:
            yield from self._statistics()
            return
        start, deadline = self.now, self._deadline
        finishing: list[tuple[float, int, float]] = []  # (when, task index, session seconds)
        vanishing: list[tuple[float, int]] = []  # (when the engine notices, task index)
        for i, task in enumerate(self._tasks):
            seconds, online_until = self._session(task)
            end = start + seconds
            if end <= online_until and end <= deadline:
                finishing.append((end, i, seconds))
            elif online_until < min(end, deadline):
                vanishing.append((online_until + self._silent_after, i))
        finishing.sort()
        outcomes = self.backend.train([self._train_job(self._tasks[i]) for _, i, _ in finishing])
        timeline = sorted(
            [(t, i, "reply") for t, i, _ in finishing] + [(t, i, "silent") for t, i in vanishing]
        )
        seconds_of = {i: s for _, i, s in finishing}
        done = 0
        for when, i, kind in timeline:
            if when > deadline:
                break
            self.now = max(self.now, when)
            task = self._tasks[i]
            if kind == "silent":
                self._silent.add(task.client)
                yield None
                continue
            outcome = next(outcomes)
            done += 1
            yield self._reply(task, outcome, seconds_of[i])
            if self.on_client:
                self.on_client(done, len(finishing))
        if math.isfinite(deadline):
            self.now = max(self.now, deadline)  # the stragglers miss it
        yield None

    def _reply(self, task: Task, outcome: TrainOutcome, seconds: float) -> TrainReply:
        return TrainReply(
            outcome.client,
            to_tensors(outcome.update),
            tuple(self.parts.labels[task.position]),
            outcome.num_samples,
            {"loss": outcome.loss, "accuracy": outcome.accuracy},
            seconds,  # simulated: what the level policy reads
            checked=True,  # this process's own sessions trained it from the task
        )

    # -- buffered versions ------------------------------------------------------------
    def dispatch(self, tasks: Sequence[VersionTask], state: State) -> None:
        """Start every task's session now (the backend runs them while the clock moves on)."""
        if state is not self._state:  # a new version: downloads are cached per version
            self._state, self._downloads, self._download_sizes = state, {}, {}
        for version_task in tasks:
            task = version_task.task
            self._round = version_task.version + 1  # the task's round, as a device is told
            seconds, online_until = self._session(task)
            end = self.now + seconds
            outcome = None
            if end <= online_until:
                outcome = iter(self.backend.train([self._train_job(task)]))
                when = end
            else:
                when = online_until + self._silent_after
            scheduled = _Scheduled(task, version_task.version, seconds, outcome)
            heapq.heappush(self._events, (when, next(self._order), scheduled))

    def arrivals(self, after: int = 0) -> Iterator[Event | None]:
        """Updates and losses in simulated-time order; None when nothing is in flight.

        A simulation never resumes, so ``after`` (the fold position to continue from) is 0.
        """
        while True:
            if not self._events:
                yield None
                continue
            when, order, scheduled = heapq.heappop(self._events)
            task = scheduled.task
            if (task.client, scheduled.version) in self._released:
                continue
            self.now = max(self.now, when)
            if scheduled.outcome is None:
                yield Lost(task.client, scheduled.version, "offline")
                continue
            outcome = next(scheduled.outcome)
            reply = self._reply(task, outcome, scheduled.seconds)
            yield Arrival(order, scheduled.version, reply)

    def published(self, version: int) -> None:
        return None

    def release(self, tasks: Sequence[VersionTask]) -> None:
        self._released.update((t.client, t.version) for t in tasks)

    def idle(self) -> None:
        """Nobody can train now: the clock moves to the next client coming online."""
        self._advance_to_arrival()
