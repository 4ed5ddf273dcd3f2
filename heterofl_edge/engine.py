"""The round engine: one HeteroFL round life cycle, whatever carries the messages.

``RoundEngine.run`` repeats, for every round still to run (paper Algorithm 1):

1. wait until enough clients are live, and choose this round's among them
   (``HeteroFLStrategy``); the ``LevelPolicy`` gives each its width;
2. hand out training tasks and fold every reply into a streaming
   ``HeteroFLAggregator`` as it arrives; the phase closes when every selected
   client has answered or gone silent and the quorum is met, or at the deadline;
3. finalise the aggregate (a round without quorum fails and keeps the model);
4. ask clients for sBN statistics of the new global model and combine them;
5. evaluate the global model;

with a checkpoint in the ``Journal`` after every step, so that a restarted
engine resumes the open round where it stopped.

The engine does no I/O of its own and never sleeps: a ``Transport`` carries
tasks and replies (in process for ``simulate``, over HTTP for the
coordinator), a ``Journal`` keeps checkpoints, and time comes from an injected
clock. The same engine therefore runs the simulation and the coordinator.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import torch

from heterofl_edge.bn_stats import ChannelMoments, apply_statistics
from heterofl_edge.errors import InternalError
from heterofl_edge.levels import parse_rate, rate_label
from heterofl_edge.secagg import (
    MODULUS_BITS,
    BelowThreshold,
    LayoutPlan,
    MaskRequest,
    Quantizer,
    SecAggRefusal,
    SecAggServer,
    ShareRequest,
    Stage,
    UnmaskRequest,
    statistics_layout,
)
from heterofl_edge.secure_aggregation import (
    instance_context,
    sbn_layers,
    state_from_sums,
    statistics_from_sums,
)
from heterofl_edge.strategy import HeteroFLStrategy, RoundPlan

__all__ = [
    "Client",
    "EngineSettings",
    "Journal",
    "LevelPolicy",
    "Outcome",
    "Phase",
    "PlanLevels",
    "ResumePoint",
    "RoundEngine",
    "RoundOpen",
    "RoundResult",
    "SecureInput",
    "SecureTransport",
    "StageReply",
    "StageRequest",
    "StatisticsClients",
    "StatsReply",
    "Stopped",
    "Task",
    "TrainReply",
    "Transport",
]

log = logging.getLogger("heterofl_edge.engine")

State = dict[str, torch.Tensor]


class Stopped(Exception):
    """The run is stopping: raised by work the engine waits on (an evaluation) to end it early.

    The engine returns at once; the journal still holds the step in progress,
    which runs again when the engine resumes.
    """


class Phase(StrEnum):
    training = "training"
    statistics = "statistics"


class StatisticsClients(StrEnum):
    """Who reports sBN statistics after a round.

    ``all``: every live client (the paper's), but those that missed the round;
    ``round``: the round's uploaders; ``none``: nobody (the statistics stay).
    """

    all = "all"
    round = "round"
    none = "none"


@dataclass(frozen=True)
class Client:
    """A client the transport can reach: a stable id and its registration position.

    The strategy selects by position (the data shard a simulated client holds,
    the registration order of a device), so selection is the same in process
    and over the network.
    """

    id: str
    position: int


@dataclass(frozen=True)
class Task:
    """One client's work in a phase: its width, and for training its lr and batch seed.

    ``offset`` is where its sub-model's window starts in every width dimension
    (``slicing.Submodel``; 0 is HeteroFL's upper-left slice): the server's
    business, a device trains whatever sub-model of its width it is sent.
    """

    client: str
    position: int
    rate: float
    lr: float = 0.0
    seed: int = 0
    offset: int = 0


@dataclass(frozen=True)
class TrainReply:
    """An accepted training result.

    ``checked``: the transport validated the update (names, shapes, dtype,
    finite values) and hands it on unchanged, so the aggregator need not look
    again; otherwise it does.
    """

    client: str
    update: Mapping[str, torch.Tensor]
    labels: tuple[int, ...] | None
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    seconds: float | None = None  # how long the client took, from task to reply
    checked: bool = False
    masked: np.ndarray | None = None  # secure aggregation: the masked vector (no update)


@dataclass(frozen=True)
class StatsReply:
    """An accepted statistics report: moments, or (secure aggregation) a masked vector."""

    client: str
    moments: Mapping[str, ChannelMoments]
    masked: np.ndarray | None = None


Reply = TrainReply | StatsReply


@dataclass(frozen=True)
class StageRequest:
    """One client's part of a secure aggregation stage (``heterofl_edge.secagg``).

    ``context`` names the aggregation (its keys and masks are bound to it),
    ``index`` is the client's number in it; ``body`` is the stage's request:
    None (advertise your keys), a ``ShareRequest`` or an ``UnmaskRequest``.
    """

    context: str
    index: int
    body: ShareRequest | UnmaskRequest | None = None


@dataclass(frozen=True)
class StageReply:
    """A client's accepted answer to a stage of the instance named ``context``.

    An ``Advertisement``, its encrypted shares (neighbour index -> bytes), or its
    unmasking shares (client index -> field element).
    """

    context: str
    client: str
    body: Any


@dataclass(frozen=True)
class SecureInput:
    """What a client needs to mask its training or statistics upload.

    ``request``: the neighbours that shared keys (their layouts) and their
    encrypted shares for this client; training: ``fixed`` and ``plan`` (the
    round's fixed point and vector layout); statistics: ``layers`` and
    ``statistics_scale`` (the wide encoding of the sums).
    """

    context: str
    index: int
    request: MaskRequest
    fixed: Quantizer | None = None
    plan: LayoutPlan | None = None
    layers: tuple[tuple[str, int], ...] = ()
    statistics_scale: float = 0.0
    rates: Mapping[int, float] = field(default_factory=dict)  # training: index -> level

    @property
    def modulus_bits(self) -> int:
        """The bits of the ring its masked upload lives in (statistics: always 32)."""
        return MODULUS_BITS if self.fixed is None else self.fixed.modulus_bits


class Transport(Protocol):
    """How the engine reaches clients. Every method may block; none may sleep past ``poll``."""

    def wait_for_clients(self, minimum: int) -> list[Client] | None:
        """At least ``minimum`` live clients, in position order; None when the run stops."""

    def population(self) -> int:
        """How many clients exist, live or not (positions run from 0 to this)."""

    def open_phase(
        self, round_number: int, phase: Phase, tasks: Sequence[Task], state: State, deadline: float
    ) -> None:
        """Publish ``tasks``; clients take sub-models of ``state`` at their task's rate."""

    def replies(self, round_number: int, phase: Phase) -> Iterator[Reply | None]:
        """Replies as they are accepted; ``None`` whenever the engine should look at the clock."""

    def all_silent(self, clients: Sequence[str]) -> bool:
        """Whether every one of ``clients`` has gone silent (the engine stops waiting for them).

        Called after each reply while a phase is open: stop at the first live client, so
        that a thousand outstanding devices cost one look, not a thousand.
        """

    def close_phase(self, round_number: int, phase: Phase) -> list[Reply]:
        """Refuse further replies; return those accepted since ``replies`` last yielded."""

    def stopping(self) -> bool:
        """True once the run should stop at the next safe point."""


class SecureTransport(Transport, Protocol):
    """A transport whose clients speak secure aggregation (``heterofl_edge.secagg``).

    Its ``open_phase`` takes ``secure``, each client's ``SecureInput``: the
    replies then carry masked vectors (``masked``) and nothing else of the client's.
    """

    def open_phase(
        self,
        round_number: int,
        phase: Phase,
        tasks: Sequence[Task],
        state: State,
        deadline: float,
        secure: Mapping[str, SecureInput] | None = None,
    ) -> None:
        """Publish ``tasks``; with ``secure``, each client masks what it sends."""

    def open_stage(
        self,
        round_number: int,
        phase: Phase,
        stage: Stage,
        requests: Mapping[str, StageRequest],
        deadline: float,
    ) -> None:
        """Publish one instance's secure aggregation stage (advertise, share, unmask).

        Several instances' stages may be open at once (a round's training and
        statistics instances share their key set-up): each stays open until
        ``close_stages``, and a client answers its open stages one after another.
        """

    def stage_replies(self, round_number: int) -> Iterator[StageReply | None]:
        """The open stages' accepted answers as they come; ``None`` to look at the clock."""

    def close_stages(self, round_number: int) -> list[StageReply]:
        """Refuse further answers to every open stage; return those not yielded yet."""


@dataclass(frozen=True)
class RoundOpen:
    """A round in progress, as the journal keeps it."""

    round: int
    phase: Phase
    lr: float
    tasks: tuple[Task, ...]
    opened_at: float
    deadline: float
    stats_tasks: tuple[Task, ...] = ()
    stats_deadline: float | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)  # the training phase's, once closed


@dataclass(frozen=True)
class ResumePoint:
    completed_rounds: int
    global_state: State
    open_round: RoundOpen | None = None
    # What the finished rounds released (their results' ``privacy``), in order: a private
    # run's accountant starts from them.
    privacy_history: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class RoundResult:
    """What a finished (or failed) round reports; strict-JSON friendly (no NaN)."""

    round: int
    state: str  # finished | failed
    lr: float
    selected: int
    uploads: int
    timed_out: int
    levels: dict[str, int]
    train_loss: float | None
    train_accuracy: float | None
    train_samples: int
    statistics_reports: int
    opened_at: float
    closed_at: float  # when the training phase closed (a close starts here)
    finished_at: float  # when everything, evaluation included, was done
    seconds: dict[str, float]  # training, aggregation, statistics, evaluation
    evaluation: dict[str, float | None] = field(default_factory=dict)
    reason: str | None = None  # why a round failed, or what went wrong on the server
    pool: int = 0  # the live clients the round's were drawn from
    privacy: dict[str, Any] | None = None  # a private run's release and epsilon so far

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "state": self.state,
            "lr": self.lr,
            "selected": self.selected,
            "uploads": self.uploads,
            "timed_out": self.timed_out,
            "levels": dict(self.levels),
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "train_samples": self.train_samples,
            "statistics_reports": self.statistics_reports,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "finished_at": self.finished_at,
            "seconds": dict(self.seconds),
            "evaluation": dict(self.evaluation),
            "reason": self.reason,
            "pool": self.pool,
            "privacy": None if self.privacy is None else dict(self.privacy),
        }


class Journal(Protocol):
    """Where the engine keeps its checkpoints (memory, files, a database)."""

    def resume(self) -> ResumePoint | None:
        """The last checkpoint, or None for a fresh run."""

    def round_opened(self, opened: RoundOpen) -> None: ...

    def training_closed(self, opened: RoundOpen, state: State) -> None:
        """The aggregate is final; ``opened`` carries the statistics tasks (if any)."""

    def round_finished(self, result: RoundResult, state: State) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """How one selected client fared in a round (for policies that re-level)."""

    client: str
    rate: float
    seconds: float | None  # None: it did not answer in time
    deadline_seconds: float


class LevelPolicy(Protocol):
    """Each selected client's width for a round."""

    def rates(self, plan: RoundPlan, chosen: Sequence[Client]) -> list[float]: ...

    def observe(self, round_number: int, outcomes: Sequence[Outcome]) -> None: ...


class PlanLevels:
    """The paper's policies: the strategy's Fix or Dynamic draw decides."""

    def rates(self, plan: RoundPlan, chosen: Sequence[Client]) -> list[float]:
        return [task.rate for task in plan.tasks]

    def observe(self, round_number: int, outcomes: Sequence[Outcome]) -> None:
        return None


@dataclass(frozen=True)
class EngineSettings:
    rounds: int
    # The first round opens once this many clients are live (the fleet assembles); later
    # rounds open as soon as enough are live to reach the quorum.
    min_clients: int = 1
    min_uploads: int = 1  # a round without this many uploads fails and keeps the model
    round_seconds: float = math.inf  # training deadline
    stats_seconds: float = math.inf  # statistics deadline
    statistics: StatisticsClients = StatisticsClients.round
    # Secure aggregation: how long its key advertisement, key sharing and unmasking stages
    # each wait for answers (clients answer them in milliseconds; training has its deadline).
    secure_stage_seconds: float = math.inf


Evaluator = Callable[[State], Mapping[str, float | None]]
Clock = Callable[[], float]


@dataclass(frozen=True)
class _StagePart:
    """One instance's part of a secure aggregation stage: its requests and their taker."""

    phase: Phase
    instance: SecAggServer
    requests: Mapping[str, StageRequest]
    accept: Callable[[str, Any], Any]  # SecAggRefusal: the answer is left out
    what: str  # what an answer is, for the log


@dataclass(frozen=True)
class _PreparedStatistics:
    """A round's statistics instance, its keys set up beside the training instance's.

    ``requests``: each client that shared keys and what it masks with, or why
    the set-up fell below the threshold.
    """

    round: int
    instance: SecAggServer
    requests: Mapping[str, MaskRequest] | BelowThreshold


class RoundEngine:
    """Runs rounds over a ``Transport``; see the module docstring for one round."""

    def __init__(
        self,
        strategy: HeteroFLStrategy,
        settings: EngineSettings,
        transport: Transport,
        journal: Journal,
        initial_state: Callable[[], State],
        clock: Clock,
        policy: LevelPolicy | None = None,
        evaluate: Evaluator | None = None,
        has_statistics: bool = True,
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.settings = settings
        self.transport = transport
        self.journal = journal
        self.clock = clock
        self.policy: LevelPolicy = policy or PlanLevels()
        self.evaluate = evaluate
        self.has_statistics = has_statistics
        self.on_round = on_round
        self.exhausted: str | None = None  # why the run ended early (its privacy budget)
        self._statistics_problem: str | None = None  # why a round's statistics were kept
        self._prepared_statistics: _PreparedStatistics | None = None  # secure runs
        if strategy.secure is not None and not callable(getattr(transport, "open_stage", None)):
            raise InternalError("secure aggregation needs a transport that runs its stages")
        resume = journal.resume()
        if resume is None:
            self.completed = 0
            self.global_state = initial_state()
            self._resume_open: RoundOpen | None = None
        else:
            self.completed = resume.completed_rounds
            self.global_state = resume.global_state
            self._resume_open = resume.open_round
            if strategy.privacy is not None:
                strategy.privacy.restore(resume.privacy_history)
                opened = resume.open_round
                if opened is not None:  # admitted before the restart; solves a target's noise
                    pool = int(opened.summary.get("pool", len(opened.tasks)))
                    strategy.admit_round(
                        opened.round, pool, len(opened.tasks), self._statistics_release()
                    )

    @property
    def done(self) -> bool:
        """Every round has run, or the run may run no more (``exhausted`` says why)."""
        return self.completed >= self.settings.rounds or self.exhausted is not None

    # -- the loop -------------------------------------------------------------
    def run(self) -> None:
        """Run every round still to run, or until the transport says stop."""
        try:
            while not self.done and not self.transport.stopping():
                resumed = self._resume_open
                opened = resumed or self._open_round(self.completed + 1)
                self._resume_open = None
                if opened is None:
                    return
                if resumed is not None and self.strategy.secure is not None:
                    opened = self._abandon_secure(resumed)
                    if opened is None:
                        continue
                self._run_round(opened)
        except Stopped:
            return

    def _abandon_secure(self, opened: RoundOpen) -> RoundOpen | None:
        """A secure round found open at start-up: its keys and masks died with the last run.

        Nothing of it is unmasked now: a round still training fails (the model
        stays); a round in its statistics phase finishes without new statistics.
        """
        if opened.phase is Phase.training:
            reason = (
                "abandoned: the run restarted during secure aggregation (the clients' keys "
                "for this round are gone; nothing was unmasked)"
            )
            log.warning("round %d %s", opened.round, reason)
            now = self.clock()
            summary = _training_summary(opened, [], now, private=True)
            result = RoundResult(
                **summary, state="failed", statistics_reports=0, finished_at=now, reason=reason
            )
            self._record(result)
            return None
        self._statistics_problem = (
            "sBN statistics skipped: the run restarted during their secure aggregation"
        )
        log.warning("round %d: %s", opened.round, self._statistics_problem)
        return replace(opened, stats_tasks=())

    def initial_statistics(self, clients: Sequence[Client]) -> Mapping[str, float | None]:
        """SBN statistics from ``clients`` and an evaluation, before any training (round 0).

        A model without sBN layers (``has_statistics`` False) is only evaluated.
        """
        if self.has_statistics:
            opened = RoundOpen(0, Phase.statistics, 0.0, (), self.clock(), self.clock())
            tasks = tuple(Task(c.id, c.position, self.strategy.mix.global_rate) for c in clients)
            gathered = self._statistics_phase(opened, tasks, math.inf)
            if gathered is not None:
                self.global_state = gathered[0]
        return self._evaluate()[0]

    def _open_round(self, number: int) -> RoundOpen | None:
        settings = self.settings
        needed = settings.min_clients if number == 1 else max(1, settings.min_uploads)
        clients = self.transport.wait_for_clients(needed)
        if clients is None:
            return None
        by_position = {c.position: c for c in clients}
        plan = self.strategy.configure_round(
            number, sorted(by_position), self.transport.population()
        )
        chosen = [by_position[task.client_id] for task in plan.tasks]
        refusal = self.strategy.admit_round(
            number, len(by_position), len(chosen), self._statistics_release()
        )
        if refusal is not None:
            self.exhausted = refusal
            log.warning("the run stops before round %d: %s", number, refusal)
            return None
        rates = self.policy.rates(plan, chosen)
        tasks = tuple(
            Task(c.id, c.position, rate, plan.lr, task.seed, plan.offset)
            for c, rate, task in zip(chosen, rates, plan.tasks, strict=True)
        )
        now = self.clock()
        opened = RoundOpen(
            number,
            Phase.training,
            plan.lr,
            tasks,
            now,
            now + self.settings.round_seconds,
            summary={"pool": len(by_position)},  # the live clients the round was drawn from
        )
        self.journal.round_opened(opened)
        return opened

    def _statistics_release(self) -> str:
        """Whose sBN statistics a round releases: sampled (its uploaders), all, or none."""
        if not self.has_statistics or self.settings.statistics is StatisticsClients.none:
            return "none"
        return "all" if self.settings.statistics is StatisticsClients.all else "sampled"

    def _run_round(self, opened: RoundOpen) -> None:
        if opened.phase is Phase.training:
            closed = self._training_phase(opened)
            if closed is None:
                return  # failed without quorum, or stopped
            opened = closed
        self._finish_round(opened)

    # -- training ---------------------------------------------------------------
    def _training_phase(self, opened: RoundOpen) -> RoundOpen | None:
        number = opened.round
        gathered = (
            self._plain_training(opened)
            if self.strategy.secure is None
            else self._secure_training(opened)
        )
        if gathered is None:
            return None  # stopped
        replies, finalize, failure = gathered
        closed_at = self.clock()
        uploads = [replies[t.client] for t in opened.tasks if t.client in replies]
        outcomes = [
            Outcome(
                t.client,
                t.rate,
                replies[t.client].seconds if t.client in replies else None,
                opened.deadline - opened.opened_at,
            )
            for t in opened.tasks
        ]
        self.policy.observe(number, outcomes)
        summary = _training_summary(opened, uploads, closed_at, self._releases_nothing)
        if len(uploads) < max(1, self.settings.min_uploads) or failure is not None:
            reason = failure or (
                f"{len(uploads)} uploads, fewer than the quorum {self.settings.min_uploads}"
            )
            result = RoundResult(
                **summary,
                state="failed",
                statistics_reports=0,
                finished_at=closed_at,
                reason=reason,
            )
            self._record(result)
            return None
        start = self.clock()
        self.global_state = finalize()
        summary["seconds"]["aggregation"] = self.clock() - start
        stats_tasks: tuple[Task, ...] = ()
        if self.has_statistics and self.settings.statistics is not StatisticsClients.none:
            stats_tasks = self._statistics_tasks(opened, uploads)
        now = self.clock()
        closed = replace(
            opened,
            phase=Phase.statistics,
            stats_tasks=stats_tasks,
            stats_deadline=now + self.settings.stats_seconds,
            summary=summary,
        )
        self.journal.training_closed(closed, self.global_state)
        return closed

    @property
    def _secure_transport(self) -> SecureTransport:
        """The transport, which a secure run's clients reach through (checked at start)."""
        return self.transport  # type: ignore[return-value]

    @property
    def _releases_nothing(self) -> bool:
        """Whether rounds keep no client's own numbers (DP, or secure aggregation)."""
        return self.strategy.private or self.strategy.secure is not None

    def _plain_training(
        self, opened: RoundOpen
    ) -> tuple[dict[str, TrainReply], Callable[[], State], str | None] | None:
        """Every reply folded into the strategy's aggregator as it comes; None if stopped."""
        number = opened.round
        aggregator = self.strategy.aggregator(self.global_state, number)
        rates = {t.client: t.rate for t in opened.tasks}
        offsets = {t.client: t.offset for t in opened.tasks}
        self.transport.open_phase(
            number, Phase.training, opened.tasks, self.global_state, opened.deadline
        )
        replies: dict[str, TrainReply] = {}

        def fold(reply: Reply) -> None:
            if not isinstance(reply, TrainReply) or reply.client not in rates:
                raise InternalError(f"round {number}: unexpected reply {reply!r}")
            if reply.client in replies:
                return
            aggregator.add(
                reply.update,
                rates[reply.client],
                reply.labels,
                offsets[reply.client],
                checked=reply.checked,
            )
            replies[reply.client] = reply

        outstanding = [t.client for t in opened.tasks]
        for reply in self.transport.replies(number, Phase.training):
            if reply is not None:
                fold(reply)
            if self.transport.stopping():
                return None
            if self._can_close(outstanding, replies, opened.deadline):
                break
        for reply in self.transport.close_phase(number, Phase.training):
            fold(reply)
        return replies, aggregator.finalize, None

    # -- secure aggregation ---------------------------------------------------------
    def _secure_training(
        self, opened: RoundOpen
    ) -> tuple[dict[str, TrainReply], Callable[[], State], str | None] | None:
        """The round's training through secure aggregation (``heterofl_edge.secagg``).

        Keys are advertised and shared, the clients that shared train and upload
        masked vectors, the survivors help unmask the sum; the coordinator sees
        only the per-element sums. Below the threshold at any stage the round
        fails with the reason (and nothing more is asked of the clients).
        """
        number, secure = opened.round, self.strategy.secure
        assert secure is not None
        global_rate = self.strategy.mix.global_rate
        plan = self.strategy.training_plan()
        rates = {t.client: t.rate for t in opened.tasks}
        fixed = secure.quantizer(len(opened.tasks))
        instance = SecAggServer(
            instance_context(number, Phase.training.value),
            [(t.client, plan.layout(t.rate)) for t in opened.tasks],
            plan.layout(global_rate),
            secure.threshold,
            secrets.randbits(63),
            minimum=max(2, self.settings.min_uploads),
            modulus_bits=fixed.modulus_bits,
        )
        replies: dict[str, TrainReply] = {}
        instances = {Phase.training: instance}
        # The statistics instance's keys are set up in the training instance's stages (two
        # exchanges fewer) when its clients are the round's: --statistics round, or all with
        # every live client in the round. Then it draws the training's neighbour graph, so
        # that the same dropouts leave both above (or both below) the threshold. Otherwise
        # (devices outside the round, busy ones among them) it sets up after training.
        candidates = set(self._statistics_candidates(opened))
        statistics = None
        if candidates and candidates <= set(rates):
            ordered = [t.client for t in opened.tasks if t.client in candidates]
            statistics = self._statistics_instance(number, ordered, instance.graph_seed)
            instances[Phase.statistics] = statistics
        try:
            set_up = self._secure_setup(number, opened.deadline, instances)
            if set_up is None:
                return None
            requests = set_up[Phase.training]
            if isinstance(requests, BelowThreshold):
                raise requests
            if statistics is not None:
                self._prepared_statistics = _PreparedStatistics(
                    number, statistics, set_up[Phase.statistics]
                )
            inputs = {
                client: SecureInput(
                    instance.context,
                    instance.index[client],
                    request,
                    fixed=fixed,
                    plan=plan,
                    rates={i: rates[c] for c, i in instance.index.items()},
                )
                for client, request in requests.items()
            }
            tasks = [t for t in opened.tasks if t.client in inputs]
            self._secure_transport.open_phase(
                number, Phase.training, tasks, self.global_state, opened.deadline, secure=inputs
            )

            def fold(reply: Reply) -> None:
                if not isinstance(reply, TrainReply) or reply.client not in inputs:
                    raise InternalError(f"round {number}: unexpected reply {reply!r}")
                if reply.client in replies or reply.masked is None:
                    return
                try:
                    instance.accept_masked(reply.client, reply.masked)
                except SecAggRefusal as exc:  # the transport checks first: a bug if it happens
                    log.warning(
                        "round %d: masked input of %s refused: %s", number, reply.client, exc
                    )
                    return
                replies[reply.client] = reply

            outstanding = [t.client for t in tasks]
            for reply in self.transport.replies(number, Phase.training):
                if reply is not None:
                    fold(reply)
                if self.transport.stopping():
                    return None
                if self._can_close(outstanding, replies, opened.deadline):
                    break
            for reply in self.transport.close_phase(number, Phase.training):
                fold(reply)
            if len(replies) < max(1, self.settings.min_uploads):
                return replies, lambda: self.global_state, None  # fails by quorum: no unmasking
            sums = self._secure_unmask(instance, number, Phase.training)
            if sums is None:
                return None
        except BelowThreshold as exc:
            log.warning("round %d: secure aggregation abandoned: %s", number, exc.message)
            return replies, lambda: self.global_state, f"secure aggregation abandoned: {exc}"
        survivors = [rates[c] for c in replies]
        strategy = self.strategy

        def finalize() -> State:
            return state_from_sums(
                self.global_state, strategy.spec, global_rate, plan, fixed, sums, survivors
            )

        return replies, finalize, None

    def _statistics_candidates(self, opened: RoundOpen) -> list[str]:
        """Who may report the round's sBN statistics, as far as it is known at its opening.

        ``round``: the round's clients; ``all``: every client live now (one that
        registers during training sits the secure statistics out).
        """
        if not self.has_statistics or self.settings.statistics is StatisticsClients.none:
            return []
        if self.settings.statistics is StatisticsClients.round:
            return [t.client for t in opened.tasks]
        return [c.id for c in self.transport.wait_for_clients(0) or []]

    def _statistics_instance(
        self, number: int, clients: Sequence[str], graph_seed: int | None = None
    ) -> SecAggServer:
        """A secure aggregation of ``clients``' sBN sums (``sbn_layers`` of the global model).

        ``graph_seed``: its neighbour graph's (None: a fresh one).
        """
        secure = self.strategy.secure
        assert secure is not None
        layout = statistics_layout(sbn_layers(self.global_state))
        return SecAggServer(
            instance_context(number, Phase.statistics.value),
            [(c, layout) for c in clients],
            layout,
            secure.threshold,
            secrets.randbits(63) if graph_seed is None else graph_seed,
        )

    def _secure_setup(
        self, number: int, deadline: float, instances: Mapping[Phase, SecAggServer]
    ) -> dict[Phase, dict[str, MaskRequest] | BelowThreshold] | None:
        """Key advertisement and key sharing of ``instances`` at once (None: stopped).

        Per instance: each masking client's request, or ``BelowThreshold`` (that
        instance stops; the others go on).
        """
        outcome: dict[Phase, dict[str, MaskRequest] | BelowThreshold] = {}
        live = dict(instances)

        def closed(phase: Phase, close: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
            try:
                return close()
            except BelowThreshold as exc:
                outcome[phase] = exc
                del live[phase]
                return None

        def stage_deadline() -> float:
            return min(deadline, self.clock() + self.settings.secure_stage_seconds)

        advertise = [
            _StagePart(
                phase,
                instance,
                {c: StageRequest(instance.context, i) for c, i in instance.index.items()},
                instance.accept_advertisement,
                "keys",
            )
            for phase, instance in live.items()
        ]
        if not self._stages(number, Stage.advertise, advertise, stage_deadline()):
            return None
        share = []
        for phase, instance in list(live.items()):
            requests = closed(phase, instance.close_advertisement)
            if requests is not None:
                share.append(
                    _StagePart(
                        phase,
                        instance,
                        self._requests(instance, requests),
                        instance.accept_shares,
                        "shares",
                    )
                )
        if Phase.training in instances and Phase.training not in live:
            return outcome  # the training instance failed: the round fails, the rest is moot
        if share and not self._stages(number, Stage.share, share, stage_deadline()):
            return None
        for phase, instance in list(live.items()):
            masking = closed(phase, instance.close_shares)
            if masking is not None:
                outcome[phase] = masking
        return outcome

    def _secure_unmask(
        self, instance: SecAggServer, number: int, phase: Phase
    ) -> np.ndarray | None:
        """The unmasked sums once the survivors sent their shares (None: stopped)."""
        part = _StagePart(
            phase,
            instance,
            self._requests(instance, instance.close_masked()),
            instance.accept_unmask,
            "unmasking shares",
        )
        deadline = self.clock() + self.settings.secure_stage_seconds
        if not self._stages(number, Stage.unmask, [part], deadline):
            return None
        return instance.finalize()

    @staticmethod
    def _requests(instance: SecAggServer, requests: Mapping[str, Any]) -> dict[str, StageRequest]:
        """Each client's ``request`` for a stage, with the instance's context and its index."""
        return {
            c: StageRequest(instance.context, instance.index[c], request)
            for c, request in requests.items()
        }

    def _stages(
        self, number: int, stage: Stage, parts: Sequence[_StagePart], deadline: float
    ) -> bool:
        """Run ``stage`` of every part's instance at once; hand each answer to its part.

        An answer a part refuses is logged and left out. False: the run stopped.
        """
        answered = self._exchange(number, stage, parts, deadline)
        if answered is None:
            return False
        for part in parts:
            for client, answer in answered[part.instance.context].items():
                try:
                    part.accept(client, answer)
                except SecAggRefusal as exc:
                    log.warning("round %d: %s of %s refused: %s", number, part.what, client, exc)
        return True

    def _exchange(
        self, number: int, stage: Stage, parts: Sequence[_StagePart], deadline: float
    ) -> dict[str, dict[str, Any]] | None:
        """Publish the parts' requests; gather answers until all, silence or the deadline.

        The answers by instance context, then by client; None: the run stopped.
        """
        transport = self._secure_transport
        opened_at = self.clock()
        for part in parts:
            transport.open_stage(number, part.phase, stage, part.requests, deadline)
        wanted = {part.instance.context: part.requests for part in parts}
        got: dict[str, dict[str, Any]] = {context: {} for context in wanted}

        def keep(reply: StageReply) -> None:
            requests = wanted.get(reply.context)
            if requests is not None and reply.client in requests:
                got[reply.context].setdefault(reply.client, reply.body)

        for reply in transport.stage_replies(number):
            if reply is not None:
                keep(reply)
            if self.transport.stopping():
                return None
            outstanding = list(
                dict.fromkeys(
                    c
                    for context, requests in wanted.items()
                    for c in requests
                    if c not in got[context]
                )
            )
            if not outstanding or self.clock() >= deadline:
                break
            if self.transport.all_silent(outstanding):
                break
        for reply in transport.close_stages(number):
            keep(reply)
        log.debug(
            "round %d: %s stage of %s: %d of %d answers in %.2f s",
            number,
            stage.value,
            " and ".join(part.phase.value for part in parts),
            sum(len(answers) for answers in got.values()),
            sum(len(requests) for requests in wanted.values()),
            self.clock() - opened_at,
        )
        return got

    def _can_close(
        self, clients: Sequence[str], replies: Mapping[str, Any], deadline: float
    ) -> bool:
        outstanding = [c for c in clients if c not in replies]
        if not outstanding:
            return True
        if self.clock() >= deadline:
            return True
        quorum = len(replies) >= max(1, self.settings.min_uploads)
        return quorum and self.transport.all_silent(outstanding)

    def _statistics_tasks(
        self, opened: RoundOpen, uploads: Sequence[TrainReply]
    ) -> tuple[Task, ...]:
        global_rate = self.strategy.mix.global_rate
        if self.settings.statistics is StatisticsClients.all:
            # Every live client, but those that missed this round: they are still busy with
            # its training (a straggler), and asking them would only hold the phase up.
            uploaded = {u.client for u in uploads}
            missed = {t.client for t in opened.tasks} - uploaded
            clients = self.transport.wait_for_clients(0) or []
            return tuple(Task(c.id, c.position, global_rate) for c in clients if c.id not in missed)
        positions = {t.client: t.position for t in opened.tasks}
        return tuple(Task(u.client, positions[u.client], global_rate) for u in uploads)

    # -- statistics, evaluation ---------------------------------------------------
    def _finish_round(self, opened: RoundOpen) -> None:
        summary: dict[str, Any] = {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in opened.summary.items()
        }
        reports = 0
        start = self.clock()
        if opened.stats_tasks:
            deadline = opened.stats_deadline if opened.stats_deadline is not None else math.inf
            gathered = self._statistics_phase(opened, opened.stats_tasks, deadline)
            if gathered is None:
                return  # stopped: the journal still holds the open statistics phase
            self.global_state, reports = gathered
        summary["seconds"]["statistics"] = self.clock() - start
        evaluation, seconds, problem = self._evaluate()
        if self._statistics_problem is not None:
            problem = "; ".join(p for p in (self._statistics_problem, problem) if p)
            self._statistics_problem = None
        summary["seconds"]["evaluation"] = seconds
        upload_rates = [
            rate for level, n in summary["levels"].items() for rate in [parse_rate(level)] * n
        ]
        privacy = self.strategy.release(
            summary["pool"], summary["selected"], self._statistics_release(), upload_rates
        )
        result = RoundResult(
            **summary,
            state="finished",
            statistics_reports=reports,
            finished_at=self.clock(),
            evaluation=dict(evaluation),
            reason=problem,
            privacy=privacy,
        )
        self._record(result)

    def _statistics_phase(
        self, opened: RoundOpen, tasks: Sequence[Task], deadline: float
    ) -> tuple[State, int] | None:
        """The global state with the clients' statistics applied, and how many reported."""
        if self.strategy.secure is not None:
            return self._secure_statistics(opened, tasks, deadline)
        number = opened.round
        self.transport.open_phase(number, Phase.statistics, tasks, self.global_state, deadline)
        wanted = {t.client for t in tasks}
        reports: dict[str, Mapping[str, ChannelMoments]] = {}

        def keep(reply: Reply) -> None:
            if isinstance(reply, StatsReply) and reply.client in wanted:
                reports.setdefault(reply.client, reply.moments)

        for reply in self.transport.replies(number, Phase.statistics):
            if reply is not None:
                keep(reply)
            if self.transport.stopping():
                return None
            outstanding = [c for c in wanted if c not in reports]
            if not outstanding or self.clock() >= deadline:
                break
            if self.transport.all_silent(outstanding):
                break
        for reply in self.transport.close_phase(number, Phase.statistics):
            keep(reply)
        ordered = [reports[t.client] for t in tasks if t.client in reports]
        if not ordered:
            return self.global_state, 0
        combined = self.strategy.combine_statistics(ordered, number)
        return apply_statistics(self.global_state, combined), len(ordered)

    def _secure_statistics(
        self, opened: RoundOpen, tasks: Sequence[Task], deadline: float
    ) -> tuple[State, int] | None:
        """The sBN statistics as a second secure aggregation: count, sum, sum of squares.

        Below the threshold the statistics stay as they were and the round says why.
        """
        number, secure = opened.round, self.strategy.secure
        assert secure is not None
        prepared, self._prepared_statistics = self._prepared_statistics, None
        layers = sbn_layers(self.global_state)  # training changes no layer: the instance's
        uploaded: set[str] = set()
        try:
            if prepared is not None and prepared.round == number:
                # Keys set up with the training's: whoever shared them and is asked now masks;
                # the other sharers are dropouts, whose masks the survivors help remove.
                instance = prepared.instance
                if isinstance(prepared.requests, BelowThreshold):
                    raise prepared.requests
                wanted = {t.client for t in tasks}
                requests = {c: r for c, r in prepared.requests.items() if c in wanted}
            else:  # round 0, or clients outside the round: keys set up now
                instance = self._statistics_instance(number, [t.client for t in tasks])
                set_up = self._secure_setup(number, deadline, {Phase.statistics: instance})
                if set_up is None:
                    return None
                found = set_up[Phase.statistics]
                if isinstance(found, BelowThreshold):
                    raise found
                requests = found
            inputs = {
                client: SecureInput(
                    instance.context,
                    instance.index[client],
                    request,
                    layers=layers,
                    statistics_scale=secure.statistics_scale,
                )
                for client, request in requests.items()
            }
            subset = [t for t in tasks if t.client in inputs]
            self._secure_transport.open_phase(
                number, Phase.statistics, subset, self.global_state, deadline, secure=inputs
            )

            def keep(reply: Reply) -> None:
                if not isinstance(reply, StatsReply) or reply.client not in inputs:
                    return
                if reply.client in uploaded or reply.masked is None:
                    return
                try:
                    instance.accept_masked(reply.client, reply.masked)
                except SecAggRefusal as exc:
                    log.warning(
                        "round %d: masked statistics of %s refused: %s", number, reply.client, exc
                    )
                    return
                uploaded.add(reply.client)

            outstanding = [t.client for t in subset]
            for reply in self.transport.replies(number, Phase.statistics):
                if reply is not None:
                    keep(reply)
                if self.transport.stopping():
                    return None
                waiting = [c for c in outstanding if c not in uploaded]
                if not waiting or self.clock() >= deadline or self.transport.all_silent(waiting):
                    break
            for reply in self.transport.close_phase(number, Phase.statistics):
                keep(reply)
            sums = self._secure_unmask(instance, number, Phase.statistics)
            if sums is None:
                return None
        except BelowThreshold as exc:
            self._statistics_problem = f"sBN statistics kept: secure aggregation abandoned: {exc}"
            log.warning("round %d: %s", number, self._statistics_problem)
            return self.global_state, 0
        combined = statistics_from_sums(sums, layers, secure.statistics_scale)
        return apply_statistics(self.global_state, combined), len(uploaded)

    def _evaluate(self) -> tuple[Mapping[str, float | None], float, str | None]:
        if self.evaluate is None:
            return {}, 0.0, None
        start = self.clock()
        try:
            metrics = self.evaluate(self.global_state)
        except Stopped:
            raise
        except Exception as exc:  # a server fault: logged, reported, the run goes on
            log.exception("evaluation of the global model failed")
            return {}, self.clock() - start, f"evaluation failed: {exc}"
        return {k: _finite(v) for k, v in metrics.items()}, self.clock() - start, None

    def _record(self, result: RoundResult) -> None:
        self.journal.round_finished(result, self.global_state)
        self.completed = result.round
        if self.on_round is not None:
            self.on_round(result)


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _training_summary(
    opened: RoundOpen, uploads: Sequence[TrainReply], closed_at: float, private: bool = False
) -> dict[str, Any]:
    """The training phase's part of a round's result.

    A private run releases no client's own numbers: its losses, accuracies and
    example counts are left out (None, 0).
    """
    rates = {t.client: t.rate for t in opened.tasks}
    levels: dict[str, int] = {}
    for reply in uploads:
        label = rate_label(rates[reply.client])
        levels[label] = levels.get(label, 0) + 1
    released = [] if private else list(uploads)
    return {
        "round": opened.round,
        "lr": opened.lr,
        "selected": len(opened.tasks),
        "uploads": len(uploads),
        "timed_out": len(opened.tasks) - len(uploads),
        "levels": dict(sorted(levels.items())),
        "train_loss": _mean([float(u.metrics.get("loss", math.nan)) for u in released]),
        "train_accuracy": _mean([float(u.metrics.get("accuracy", math.nan)) for u in released]),
        "train_samples": sum(u.num_samples for u in released),
        "opened_at": opened.opened_at,
        "closed_at": closed_at,
        "seconds": {"training": closed_at - opened.opened_at},
        "pool": int(opened.summary.get("pool", len(opened.tasks))),
    }
