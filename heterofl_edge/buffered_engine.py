"""The buffered round engine: FedBuff's life cycle beside the synchronous one.

``BufferedEngine`` is a ``RoundEngine`` whose "rounds" are published model
versions. It repeats, until ``rounds`` versions are published:

1. every live client that is free (no task in flight, no update yet from the
   current version) may train, up to ``ceil(fraction x clients)`` tasks in
   flight at once: the strategy selects among the free ones and the level
   policy gives each its width, exactly as a synchronous round does, with the
   version the task starts from in place of the round (``rounds`` counts
   versions: lr schedule, selection seeds, rolling offsets follow it);
2. each arriving update is folded into a ``BufferedAggregator`` with its
   staleness weight ``s(current - started)``; one older than ``max_staleness``
   versions is refused (the coordinator refuses it at upload, with the code
   ``stale_update``) and counts as a miss for the level policy, which
   therefore still moves a device that is too slow even for buffered mode down;
3. after ``buffer_size`` updates: the new version is published (journalled),
   the sBN statistics are gathered every ``statistics_every`` versions (from
   the version's contributors, ``statistics round``, or every live free
   client, ``all``), the version is evaluated and its result recorded.

Updates are folded in the order the transport delivers them: the simulation
in simulated-time order (ties by dispatch), the coordinator in the order it
acknowledged the uploads (a sequence number committed with each
acknowledgement). The journal keeps the published versions an in-flight task
may still start from, the tasks in flight, and how far the acknowledged
updates were folded, so that a restart re-folds those acknowledged after the
last published version: nothing acknowledged is lost, and the model equals an
uninterrupted run's.

The engine does no I/O of its own and never sleeps: a ``BufferedTransport``
carries tasks and updates, a ``BufferedJournal`` keeps checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from heterofl_edge.buffered import BufferedAggregator, StalenessRule
from heterofl_edge.engine import (
    Clock,
    EngineSettings,
    Evaluator,
    LevelPolicy,
    Outcome,
    Phase,
    ResumePoint,
    RoundEngine,
    RoundOpen,
    RoundResult,
    StatisticsClients,
    Stopped,
    Task,
    TrainReply,
    Transport,
)
from heterofl_edge.errors import InternalError
from heterofl_edge.levels import rate_label
from heterofl_edge.strategy import HeteroFLStrategy

__all__ = [
    "Arrival",
    "BufferSettings",
    "BufferedEngine",
    "BufferedJournal",
    "BufferedResult",
    "BufferedResume",
    "BufferedTransport",
    "Lost",
    "MemoryBufferedJournal",
    "VersionTask",
]

log = logging.getLogger("heterofl_edge.engine")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class BufferSettings:
    """FedBuff's settings: K, the staleness rule, eta, the staleness bound, statistics cadence."""

    buffer_size: int = 10
    staleness: StalenessRule = field(default_factory=StalenessRule)
    server_lr: float = 1.0
    max_staleness: int = 20
    statistics_every: int = 1


@dataclass(frozen=True)
class VersionTask:
    """A training task that starts from model version ``version`` (0: the initial model)."""

    task: Task
    version: int
    dispatched_at: float

    @property
    def client(self) -> str:
        return self.task.client


@dataclass(frozen=True)
class Arrival:
    """An accepted update of a task that started from ``version``; ``seq`` orders the folds."""

    seq: int
    version: int
    reply: TrainReply


@dataclass(frozen=True)
class Lost:
    """A task that will deliver nothing: its client went offline, or its update was too stale."""

    client: str
    version: int
    reason: str  # offline | stale


Event = Arrival | Lost


class BufferedTransport(Transport, Protocol):
    """How the buffered engine reaches clients.

    The synchronous ``Transport``'s methods carry the sBN statistics phase of a
    published version (and the initial statistics); training goes through these.
    """

    def dispatch(self, tasks: Sequence[VersionTask], state: State) -> None:
        """Hand out ``tasks``; each client trains its sub-model of ``state`` (the version's)."""

    def arrivals(self, after: int) -> Iterator[Event | None]:
        """Updates and losses in fold order; ``None`` whenever the engine should look around.

        Updates start after fold position ``after`` (what a restarted engine has folded).
        """

    def published(self, version: int) -> None:
        """``version`` is the newest model (uploads older than the staleness bound are refused)."""

    def release(self, tasks: Sequence[VersionTask]) -> None:
        """The engine gave up on ``tasks`` (their clients went silent): refuse their results."""

    def idle(self) -> None:
        """Nothing is in flight and nobody can train: wait for a client to come (or a tick)."""


@dataclass(frozen=True)
class BufferedResume:
    """Where a restarted buffered engine continues from."""

    version: int  # the newest published version
    versions: Mapping[int, State]  # the versions in-flight tasks may start from, ``version`` too
    in_flight: tuple[VersionTask, ...]  # dispatched, not yet folded or given up
    consumed: int  # arrivals folded into ``version`` (sequence numbers up to this one)
    completed: int  # versions finished (statistics and evaluation done): version or version - 1
    statistics: RoundOpen | None = None  # ``version``'s statistics phase, if still open


class BufferedJournal(Protocol):
    """Where the buffered engine keeps its checkpoints (memory, the coordinator's store)."""

    def resume(self) -> BufferedResume | None:
        """The last checkpoint, or None for a fresh run."""

    def tasks_dispatched(self, tasks: Sequence[VersionTask]) -> None:
        """``tasks`` are about to be handed out (durably recorded first)."""

    def version_published(self, opened: RoundOpen, state: State, consumed: int) -> None:
        """Version ``opened.round`` is aggregated from the arrivals up to ``consumed``.

        Its statistics tasks (if any) are ``opened.stats_tasks``.
        """

    def round_finished(self, result: RoundResult, state: State) -> None:
        """The version is finished: statistics applied, evaluated."""


@dataclass(frozen=True)
class BufferedResult(RoundResult):
    """A published version's result: a round's fields, plus what the buffer held."""

    buffer: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["buffer"] = dict(self.buffer)
        return data


class MemoryBufferedJournal:
    """Checkpoints kept nowhere (a simulation): a fresh run every time."""

    def resume(self) -> None:
        return None

    def tasks_dispatched(self, tasks: Sequence[VersionTask]) -> None:
        return None

    def version_published(self, opened: RoundOpen, state: State, consumed: int) -> None:
        return None

    def round_finished(self, result: RoundResult, state: State) -> None:
        return None


class _Fresh:
    """The synchronous engine's journal view while the buffered one starts (no resume)."""

    def resume(self) -> ResumePoint | None:
        return None


class BufferedEngine(RoundEngine):
    """Publishes model versions from buffered updates; see the module docstring."""

    def __init__(
        self,
        strategy: HeteroFLStrategy,
        settings: EngineSettings,
        buffer: BufferSettings,
        transport: BufferedTransport,
        journal: BufferedJournal,
        initial_state: Callable[[], State],
        clock: Clock,
        policy: LevelPolicy | None = None,
        evaluate: Evaluator | None = None,
        has_statistics: bool = True,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        resume = journal.resume()
        start: Callable[[], State] = initial_state if resume is None else dict
        super().__init__(
            strategy,
            settings,
            transport,
            _Fresh(),  # type: ignore[arg-type]  # the buffered journal resumes below
            start,
            clock,
            policy,
            evaluate,
            has_statistics,
            on_round,
        )
        self.journal: BufferedJournal = journal  # type: ignore[assignment]
        self.transport: BufferedTransport = transport
        self.buffer = buffer
        self._in_flight: dict[str, VersionTask] = {}
        self._delivered: set[str] = set()  # clients with an update folded from this version
        self._consumed = 0
        self._pending_statistics: RoundOpen | None = None
        if resume is None:
            self.version = 0
            self._versions: dict[int, State] = {0: self.global_state}
        else:
            self.version = resume.version
            self._versions = dict(resume.versions)
            self.global_state = self._versions[resume.version]
            self.completed = resume.completed
            self._in_flight = {t.client: t for t in resume.in_flight}
            self._consumed = resume.consumed
            self._pending_statistics = resume.statistics
        self._open_buffer()

    def _open_buffer(self) -> None:
        """A fresh buffer on the current version (statistics applied)."""
        self._buffer = BufferedAggregator(
            self.global_state,
            self.strategy.spec,
            self.strategy.mix.global_rate,
            self.buffer.server_lr,
        )
        self._folded: list[tuple[VersionTask, TrainReply, int]] = []
        self._opened_at = self.clock()
        self._dispatched = 0
        self._refused = 0
        self._lost = 0
        self._pool = 0

    # -- the loop -------------------------------------------------------------
    def run(self) -> None:
        """Publish versions until ``rounds`` are finished, or until the transport says stop."""
        try:
            if self._pending_statistics is not None:
                opened, self._pending_statistics = self._pending_statistics, None
                self._finish_version(opened)
            events = self.transport.arrivals(self._consumed)
            while not self.done and not self.transport.stopping():
                dispatched = self._dispatch()
                if dispatched is None:
                    return
                if not self._in_flight and not dispatched:
                    self.transport.idle()
                    continue
                event = next(events)
                if event is None:
                    self._give_up_on_silent()
                elif isinstance(event, Lost):
                    self._take_loss(event)
                else:
                    self._fold(event)
        except Stopped:
            return

    def _dispatch(self) -> int | None:
        """Hand tasks to free clients; how many (None: the run stops)."""
        first = self.version == 0 and not self._in_flight and not self._folded
        live = self.transport.wait_for_clients(self.settings.min_clients if first else 0)
        if live is None:
            return None
        population = self.transport.population()
        self._pool = max(self._pool, len(live))
        slots = self.strategy.clients_per_round(population) - len(self._in_flight)
        free = [c for c in live if c.id not in self._in_flight and c.id not in self._delivered]
        if slots <= 0 or not free:
            return 0
        plan = self.strategy.configure_round(
            self.version + 1, [c.position for c in free], population
        )
        picked = plan.tasks[:slots]
        by_position = {c.position: c for c in free}
        chosen = [by_position[t.client_id] for t in picked]
        rates = self.policy.rates(replace(plan, tasks=picked), chosen)
        now = self.clock()
        tasks = tuple(
            VersionTask(
                Task(c.id, c.position, rate, plan.lr, t.seed, plan.offset), self.version, now
            )
            for c, rate, t in zip(chosen, rates, picked, strict=True)
        )
        self.journal.tasks_dispatched(tasks)
        self.transport.dispatch(tasks, self.global_state)
        for task in tasks:
            self._in_flight[task.client] = task
        self._dispatched += len(tasks)
        return len(tasks)

    def _observe(self, task: VersionTask, seconds: float | None) -> None:
        """Tell the level policy how the task went (None: it delivered nothing usable)."""
        deadline = self.settings.round_seconds
        outcome = Outcome(task.client, task.task.rate, seconds, deadline)
        self.policy.observe(self.version + 1, [outcome])

    def _take_loss(self, event: Lost) -> None:
        task = self._in_flight.get(event.client)
        if task is None or task.version != event.version:
            return  # already given up on
        del self._in_flight[event.client]
        if event.reason == "stale":
            self._refused += 1
        else:
            self._lost += 1
        self._observe(task, None)

    def _give_up_on_silent(self) -> None:
        """Tasks whose clients went silent: the engine stops waiting for them."""
        silent = [t for t in self._in_flight.values() if self.transport.all_silent([t.client])]
        if not silent:
            return
        self.transport.release(silent)
        for task in silent:
            del self._in_flight[task.client]
            self._lost += 1
            self._observe(task, None)

    def _fold(self, event: Arrival) -> None:
        reply = event.reply
        task = self._in_flight.get(reply.client)
        if task is None or task.version != event.version:
            raise InternalError(
                f"an update of {reply.client} from version {event.version} that is not in flight"
            )
        del self._in_flight[reply.client]
        self._consumed = max(self._consumed, event.seq)
        staleness = self.version - task.version
        if staleness > self.buffer.max_staleness:
            self._refused += 1
            self._observe(task, None)
            return
        self._buffer.add(
            reply.update,
            self._versions[task.version],
            task.task.rate,
            self.buffer.staleness.weight(staleness),
            reply.labels,
            task.task.offset,
            checked=reply.checked,
        )
        self._folded.append((task, reply, staleness))
        if task.version == self.version:
            self._delivered.add(reply.client)
        self._observe(task, reply.seconds)
        if self._buffer.num_updates >= self.buffer.buffer_size:
            self._publish()

    # -- a version ----------------------------------------------------------------
    def _publish(self) -> None:
        start = self.clock()
        state = self._buffer.finalize()
        aggregation = self.clock() - start
        number = self.version + 1
        self.version = number
        self.global_state = state
        self._versions[number] = state
        for old in [v for v in self._versions if v < number - self.buffer.max_staleness]:
            del self._versions[old]
        self._delivered.clear()
        self.transport.published(number)
        summary = self._summary(number, aggregation)
        now = self.clock()
        opened = RoundOpen(
            number,
            Phase.statistics,
            self.strategy.schedule.lr_at(number),
            tuple(task.task for task, _, _ in self._folded),
            self._opened_at,
            now,
            self._version_statistics_tasks(number),
            now + self.settings.stats_seconds,
            summary,
        )
        self.journal.version_published(opened, state, self._consumed)
        self._finish_version(opened)

    def _version_statistics_tasks(self, number: int) -> tuple[Task, ...]:
        statistics = self.settings.statistics
        every = max(1, self.buffer.statistics_every)
        if not self.has_statistics or statistics is StatisticsClients.none or number % every:
            return ()
        global_rate = self.strategy.mix.global_rate
        live = self.transport.wait_for_clients(0) or []
        free = [c for c in live if c.id not in self._in_flight]
        if statistics is StatisticsClients.round:  # the version's contributors
            contributed = {task.client for task, _, _ in self._folded}
            free = [c for c in free if c.id in contributed]
        return tuple(Task(c.id, c.position, global_rate) for c in free)

    def _finish_version(self, opened: RoundOpen) -> None:
        """Statistics (if asked for), evaluation and the result of the published version."""
        summary: dict[str, Any] = {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in opened.summary.items()
        }
        buffer = summary.pop("buffer", {})
        reports = 0
        start = self.clock()
        if opened.stats_tasks:
            deadline = opened.stats_deadline if opened.stats_deadline is not None else math.inf
            gathered = self._statistics_phase(opened, opened.stats_tasks, deadline)
            if gathered is None:
                raise Stopped  # the journal still holds the open statistics phase
            self.global_state, reports = gathered
            self._versions[opened.round] = self.global_state
        summary["seconds"]["statistics"] = self.clock() - start
        evaluation, seconds, problem = self._evaluate()
        summary["seconds"]["evaluation"] = seconds
        result = BufferedResult(
            **summary,
            state="finished",
            statistics_reports=reports,
            finished_at=self.clock(),
            evaluation=dict(evaluation),
            reason=problem,
            buffer=buffer,
        )
        self._record(result)
        self._open_buffer()

    def _summary(self, number: int, aggregation: float) -> dict[str, Any]:
        """The published version's part of its result (a round's fields, and the buffer's)."""
        levels: dict[str, int] = {}
        for task, _, _ in self._folded:
            label = rate_label(task.task.rate)
            levels[label] = levels.get(label, 0) + 1
        replies = [reply for _, reply, _ in self._folded]
        now = self.clock()

        def mean(key: str) -> float | None:
            values = [float(r.metrics[key]) for r in replies if key in r.metrics]
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else None

        return {
            "round": number,
            "lr": self.strategy.schedule.lr_at(number),
            "selected": self._dispatched,
            "uploads": len(self._folded),
            "timed_out": self._lost + self._refused,
            "levels": dict(sorted(levels.items())),
            "train_loss": mean("loss"),
            "train_accuracy": mean("accuracy"),
            "train_samples": sum(r.num_samples for r in replies),
            "opened_at": self._opened_at,
            "closed_at": now,
            "seconds": {"training": now - self._opened_at, "aggregation": aggregation},
            "pool": self._pool,
            "buffer": {
                "staleness": [s for _, _, s in self._folded],
                "weights": list(self._buffer.weights),
                "started_from": [task.version for task, _, _ in self._folded],
                "refused_stale": self._refused,
                "lost": self._lost,
                "in_flight": len(self._in_flight),
            },
        }

    def version_state(self, version: int) -> State:
        """The global state of ``version`` (kept while in-flight tasks may start from it)."""
        return self._versions[version]

    def in_flight(self) -> list[VersionTask]:
        """The tasks handed out and not yet folded or given up on."""
        return list(self._in_flight.values())
