"""Simulated HeteroFL: the whole federation on one machine, or on a Ray cluster.

The rounds run on the round engine (``heterofl_edge.engine``) with a
transport that hands client sessions to a backend (``heterofl_edge.backends``:
this process, a pool of worker processes, or Ray tasks): each selected client
receives its level's slice of the global model, trains it locally, and its
update goes into the engine's streaming aggregator, in task order whatever the
order the sessions finish in. Then every client reports sBN statistics
computed with the new global model (the same workers, fresh every round), and
the global model is evaluated on the test set (and, for non-IID splits, on
each client's labels: local accuracy). With a ``FileJournal`` a killed run
resumes from its last checkpoint and ends with the same model, bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch

from heterofl_edge.assignment import parse_mode
from heterofl_edge.backends import (
    InlineBackend,
    PoolBackend,
    SessionBackend,
    available_cores,
    split_clients,
)
from heterofl_edge.data import ClassificationData
from heterofl_edge.engine import (
    Client,
    EngineSettings,
    Phase,
    RoundEngine,
    RoundOpen,
    RoundResult,
    StatisticsClients,
    StatsReply,
    Task,
    TrainReply,
)
from heterofl_edge.errors import ConfigError
from heterofl_edge.journal import FileJournal
from heterofl_edge.loss import label_mask
from heterofl_edge.models import Architecture, get_architecture
from heterofl_edge.partition import Partition, Split, federated_split
from heterofl_edge.sessions import (
    Accelerator,
    ClientArrays,
    StatsJob,
    TrainJob,
    memory_format,
    moments_from,
    place,
    resolve_device,
    session_threads,
    to_arrays,
    to_tensors,
)
from heterofl_edge.slicing import Submodel, extract_submodel_state
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule
from heterofl_edge.training import LocalTrainingConfig, predict, score_logits

__all__ = [
    "Backend",
    "Execution",
    "RoundRecord",
    "SimulationConfig",
    "SimulationResult",
    "Split",
    "Submodel",
    "run_simulation",
]


class StatsClients(StrEnum):
    """Who reports sBN statistics after each round: every client (paper), or the round's."""

    all = "all"
    round = "round"


# The paper's MNIST schedule (Table 6 and the official code): rounds and lr milestones.
PAPER_MNIST_ROUNDS = {Split.iid: 200, Split.non_iid: 400}
PAPER_MNIST_MILESTONES = {Split.iid: (100,), Split.non_iid: (200,)}


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a run depends on; the defaults are the paper's MNIST settings."""

    model: str = "conv"
    mode: str = "a-e"
    assignment: str | None = None
    split: Split = Split.iid
    rounds: int | None = None
    num_clients: int = 100
    fraction: float = 0.1
    lr: float = 0.01
    milestones: tuple[int, ...] | None = None
    lr_factor: float = 0.1
    local: LocalTrainingConfig = field(default_factory=LocalTrainingConfig)
    shards_per_client: int = 2
    stats_clients: StatsClients = StatsClients.all
    seed: int = 0
    train_examples: int | None = None
    test_examples: int | None = None
    submodel: Submodel = Submodel.static

    def __post_init__(self) -> None:
        """Refuse impossible settings before any data is loaded."""
        if self.total_rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.total_rounds}")
        if self.num_clients < 1:
            raise ConfigError(f"need at least one client, got {self.num_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"fraction {self.fraction} is outside (0, 1]",
                "it is the share of clients per round",
            )
        if self.local.epochs < 1 or self.local.batch_size < 1:
            raise ConfigError("local epochs and batch size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.model != "conv":
            raise ConfigError(
                f"simulate runs --model conv on MNIST; {self.model!r} needs a data set "
                "this build does not ship",
                "use --model conv ('models summary' covers resnet18 and transformer too)",
            )
        parse_mode(self.mode, self.assignment)

    @property
    def total_rounds(self) -> int:
        return self.rounds if self.rounds is not None else PAPER_MNIST_ROUNDS[self.split]

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        return (
            self.milestones if self.milestones is not None else PAPER_MNIST_MILESTONES[self.split]
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(split=self.split.value, stats_clients=self.stats_clients.value)
        data.update(submodel=self.submodel.value)
        data.update(rounds=self.total_rounds, milestones=list(self.lr_milestones))
        return data


class Backend(StrEnum):
    """What runs the client sessions: this machine's cores, or a Ray cluster."""

    local = "local"
    ray = "ray"


@dataclass(frozen=True)
class Execution:
    """How a run is carried out; the results do not depend on it, except on the device.

    ``workers``: sessions at once (None: every core; 1: in this process).
    ``accelerator``: where sessions run. ``backend`` and ``address``: local
    processes, or Ray tasks on the cluster at ``address`` (None: a local Ray).
    """

    workers: int | None = None
    accelerator: Accelerator = Accelerator.cpu
    backend: Backend = Backend.local
    address: str | None = None

    def __post_init__(self) -> None:
        """Refuse a worker count below 1."""
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class RoundRecord:
    round: int
    lr: float
    levels: dict[str, int]
    train_loss: float
    train_accuracy: float
    global_loss: float
    global_accuracy: float
    local_accuracy: float | None
    train_seconds: float
    round_seconds: float
    train_samples: int
    samples_per_second: float
    seconds: dict[str, float] = field(default_factory=dict)  # training, statistics, ...


@dataclass
class SimulationResult:
    config: SimulationConfig
    initial_accuracy: float
    rounds: list[RoundRecord]
    global_state: dict[str, torch.Tensor]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "initial_global_accuracy": self.initial_accuracy,
            "rounds": [asdict(r) for r in self.rounds],
        }


class _SessionTransport:
    """Clients as sessions on a backend; replies come back in task order."""

    def __init__(
        self,
        arch: Architecture,
        global_rate: float,
        backend: SessionBackend,
        parts: Partition,
        num_classes: int,
        local: LocalTrainingConfig,
        on_client: Callable[[int, int], None] | None,
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.backend = backend
        self.parts = parts
        self.num_classes = num_classes
        self.local = local
        self.on_client = on_client
        self._tasks: tuple[Task, ...] = ()
        self._state: dict[str, torch.Tensor] = {}

    def wait_for_clients(self, minimum: int) -> list[Client]:
        return [Client(str(i), i) for i in range(self.parts.num_clients)]

    def population(self) -> int:
        return self.parts.num_clients

    def open_phase(
        self,
        round_number: int,
        phase: Phase,
        tasks: Sequence[Task],
        state: dict[str, torch.Tensor],
        deadline: float,
    ) -> None:
        self._tasks, self._state = tuple(tasks), state

    def replies(self, round_number: int, phase: Phase) -> Iterator[TrainReply | StatsReply]:
        if phase is Phase.statistics:
            yield from self._statistics()
            return
        jobs = [self._train_job(task) for task in self._tasks]
        for done, outcome in enumerate(self.backend.train(jobs), start=1):
            task = self._tasks[done - 1]
            yield TrainReply(
                outcome.client,
                to_tensors(outcome.update),
                tuple(self.parts.labels[task.position]),
                outcome.num_samples,
                {"loss": outcome.loss, "accuracy": outcome.accuracy},
                outcome.seconds,
            )
            if self.on_client:
                self.on_client(done, len(jobs))

    def _train_job(self, task: Task) -> TrainJob:
        state = extract_submodel_state(
            self._state, self.arch.spec, task.rate, self.global_rate, task.offset
        )
        return TrainJob(
            task.client,
            self.arch.name,
            task.rate,
            self.global_rate,
            task.lr,
            task.seed,
            self.parts.indices[task.position],
            tuple(self.parts.labels[task.position]),
            self.num_classes,
            self.local,
            to_arrays(state),
        )

    def _statistics(self) -> Iterator[StatsReply]:
        """Every client's moments; clients go to the workers in runs of equal size."""
        tasks = self._tasks
        sizes = [len(self.parts.indices[t.position]) for t in tasks]
        state = to_arrays(self._state)
        groups = split_clients(sizes, 2 * self.backend.workers if self.backend.workers > 1 else 1)
        jobs = [
            StatsJob(
                self.arch.name,
                self.global_rate,
                state,
                tuple(tasks[i].client for i in group),
                tuple(self.parts.indices[tasks[i].position] for i in group),
            )
            for group in groups
        ]
        for outcome in self.backend.statistics(jobs):
            for client, report in outcome:
                yield StatsReply(client, moments_from(report))

    def silent(self, clients: Sequence[str]) -> set[str]:
        return set()

    def close_phase(self, round_number: int, phase: Phase) -> list[TrainReply | StatsReply]:
        return []

    def stopping(self) -> bool:
        return False


class _MemoryJournal:
    """Checkpoints kept nowhere: a run without ``--out`` journal cannot resume."""

    def resume(self) -> None:
        return None

    def round_opened(self, opened: RoundOpen) -> None:
        return None

    def training_closed(self, opened: RoundOpen, state: dict[str, torch.Tensor]) -> None:
        return None

    def round_finished(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        return None


def make_backend(execution: Execution, data: ClientArrays, device: str) -> SessionBackend:
    """The session backend ``execution`` asks for (Ray is imported only when asked for)."""
    if execution.backend is Backend.ray:
        from heterofl_edge.ray_backend import RayBackend

        return RayBackend(data, device, execution.address, execution.workers)
    workers = execution.workers or (1 if device == "cuda" else available_cores())
    if workers == 1:
        return InlineBackend(data, device)
    return PoolBackend(data, workers, device)


def fingerprint(config: SimulationConfig, device: str) -> dict[str, Any]:
    """What a run's results depend on: its settings (not the round count) and device kind."""
    data = config.to_json()
    data.pop("rounds")
    data["device"] = device
    return data


def run_simulation(
    config: SimulationConfig,
    data: ClassificationData,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_client: Callable[[int, int], None] | None = None,
    execution: Execution | None = None,
    journal_dir: Path | None = None,
    resume: bool = False,
) -> SimulationResult:
    """Run ``config`` on ``data`` and return every round's record and the final state.

    The rounds run on ``heterofl_edge.engine.RoundEngine``, the engine the
    coordinator runs too, with client sessions on the backend ``execution``
    names. ``on_round`` gets each round's record as it ends (also, on resume,
    the records of the rounds already done); ``on_client`` gets (clients done,
    clients in the round) as a round progresses. With ``journal_dir``, every
    round is checkpointed there; ``resume`` continues the run found there.
    """
    execution = execution or Execution()
    device = resolve_device(execution.accelerator)
    journal = (
        FileJournal(journal_dir, fingerprint(config, device), resume)
        if journal_dir is not None
        else None
    )
    arch = get_architecture(config.model)
    mix = parse_mode(config.mode, config.assignment)
    split = federated_split(
        data.train_labels.numpy(),
        data.test_labels.numpy(),
        config.num_clients,
        config.split,
        data.num_classes,
        config.seed,
        config.shards_per_client,
        config.train_examples,
        config.test_examples,
    )
    train_x, train_y = (
        t[torch.from_numpy(split.train_keep)] for t in (data.train_images, data.train_labels)
    )
    test_x, test_y = (
        t[torch.from_numpy(split.test_keep)] for t in (data.test_images, data.test_labels)
    )
    train_parts, test_parts = split.train, split.test
    masks = [label_mask(labels, data.num_classes) for labels in train_parts.labels]
    strategy = HeteroFLStrategy(
        arch.spec,
        mix,
        config.num_clients,
        config.fraction,
        MultiStepSchedule(config.lr, config.lr_milestones, config.lr_factor),
        config.seed,
        config.submodel,
    )
    evaluation_model = place(arch.build(mix.global_rate, mix.global_rate), device)
    test_x_placed = test_x.to(device).contiguous(memory_format=memory_format(device))

    def initial_state() -> dict[str, torch.Tensor]:
        torch.manual_seed(config.seed)
        model = arch.build(mix.global_rate, mix.global_rate)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test(state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        evaluation_model.load_state_dict(state)
        logits = predict(evaluation_model, test_x_placed).cpu()
        overall = score_logits(logits, test_y)
        local = None
        if test_parts is not None:
            correct = total = 0.0
            for c, idx in enumerate(test_parts.indices):
                part = score_logits(logits[idx], test_y[idx], masks[c])
                correct += part.accuracy * part.num_examples
                total += part.num_examples
            local = correct / max(total, 1)
        return {
            "global_loss": overall.loss,
            "global_accuracy": overall.accuracy,
            "local_accuracy": local,
        }

    records: list[RoundRecord] = []

    def record(result: RoundResult) -> None:
        evaluation = result.evaluation
        train_seconds = result.seconds["training"]
        samples = result.train_samples * config.local.epochs
        entry = RoundRecord(
            round=result.round,
            lr=result.lr,
            levels=result.levels,
            train_loss=result.train_loss if result.train_loss is not None else math.nan,
            train_accuracy=result.train_accuracy if result.train_accuracy is not None else 0.0,
            global_loss=evaluation.get("global_loss") or math.nan,
            global_accuracy=evaluation.get("global_accuracy") or 0.0,
            local_accuracy=evaluation.get("local_accuracy"),
            train_seconds=train_seconds,
            round_seconds=result.finished_at - result.opened_at,
            train_samples=samples,
            samples_per_second=samples / max(train_seconds, 1e-9),
            seconds=dict(result.seconds),
        )
        records.append(entry)
        if on_round:
            on_round(entry)

    initial: Mapping[str, float | None] = {}
    if journal is not None and journal.started:
        initial = journal.initial
        for done in journal.results:
            record(done)
    arrays = ClientArrays(train_x.numpy(), train_y.numpy())
    backend = make_backend(execution, arrays, device)
    transport = _SessionTransport(
        arch, mix.global_rate, backend, train_parts, data.num_classes, config.local, on_client
    )
    engine = RoundEngine(
        strategy,
        EngineSettings(
            rounds=config.total_rounds,
            min_clients=config.num_clients,
            statistics=StatisticsClients(config.stats_clients.value),
        ),
        transport,
        journal if journal is not None else _MemoryJournal(),
        initial_state,
        time.time,
        evaluate=test,
        on_round=record,
    )
    # This process evaluates with as many threads as sessions run at once (one for --workers 1).
    try:
        with session_threads(max(1, min(backend.workers, available_cores()))):
            if journal is None or not journal.started:
                initial = engine.initial_statistics(transport.wait_for_clients(0))
                if journal is not None:
                    journal.start(engine.global_state, initial)
            engine.run()
    finally:
        backend.close()
    return SimulationResult(
        config, float(initial.get("global_accuracy") or 0.0), records, engine.global_state
    )
