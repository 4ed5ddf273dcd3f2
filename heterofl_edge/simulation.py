"""Simulated HeteroFL: the whole federation on one machine, or on a Ray cluster.

Any registered model trains on any data set of its task (``heterofl_edge.tasks``):
conv on MNIST, resnet18 on an image folder, the transformer on WikiText-2, or a
user's ``package.module:factory`` on a user's ``package.module:loader``. The
task splits the data across clients, trains each session and scores the
global model (accuracy, or perplexity for the language model); the sBN
statistics pass runs only for models that have sBN layers.

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
from dataclasses import asdict, dataclass, field, replace
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
from heterofl_edge.data.base import TaskData
from heterofl_edge.data.registry import get_dataset, resolve_dataset
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
from heterofl_edge.models import Architecture, StaticBatchNorm2d, get_architecture
from heterofl_edge.partition import Partition, Split
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
from heterofl_edge.task_kind import TaskKind
from heterofl_edge.tasks import check_compatible, task_for
from heterofl_edge.training import LocalTrainingConfig

__all__ = [
    "PAPER_SETTINGS",
    "Backend",
    "Execution",
    "PaperSettings",
    "RoundRecord",
    "SimulationConfig",
    "SimulationResult",
    "Split",
    "Submodel",
    "dataset_for",
    "load_data",
    "local_training",
    "paper_settings",
    "run_simulation",
]


class StatsClients(StrEnum):
    """Who reports sBN statistics after each round: every client (paper), or the round's."""

    all = "all"
    round = "round"


@dataclass(frozen=True)
class PaperSettings:
    """A model's settings in the paper (Table 6, checked against the official code).

    SGD with momentum 0.9 and weight decay 5e-4, gradient norm clipped to 1,
    learning rate x0.1 at each milestone; ``data``: the data set it trains on.
    """

    lr: float
    local: LocalTrainingConfig
    rounds: Mapping[Split, int]
    milestones: Mapping[Split, tuple[int, ...]]
    data: str | None


PAPER_SETTINGS: dict[str, PaperSettings] = {
    "conv": PaperSettings(
        0.01,
        LocalTrainingConfig(epochs=5, batch_size=10),
        {Split.iid: 200, Split.non_iid: 400},
        {Split.iid: (100,), Split.non_iid: (200,)},
        "mnist",
    ),
    "resnet18": PaperSettings(
        0.1,
        LocalTrainingConfig(epochs=5, batch_size=10),
        {Split.iid: 400, Split.non_iid: 800},
        {Split.iid: (150, 250), Split.non_iid: (300, 500)},
        "imagefolder",  # CIFAR-10 as images
    ),
    # The transformer is split IID only (as in the paper); its non-IID row is the paper's.
    "transformer": PaperSettings(
        0.1,
        LocalTrainingConfig(epochs=1, batch_size=100),
        {Split.iid: 100, Split.non_iid: 200},
        {Split.iid: (25, 50), Split.non_iid: (50, 100)},
        "wikitext2",
    ),
}


def paper_settings(model: str) -> PaperSettings:
    """``model``'s settings in the paper.

    A model of a user's gets those of the built-in of its task (transformer for a
    language model, else conv), and no default data set.
    """
    if model in PAPER_SETTINGS:
        return PAPER_SETTINGS[model]
    task = get_architecture(model).task
    return replace(
        PAPER_SETTINGS["transformer" if task is TaskKind.language_model else "conv"], data=None
    )


def dataset_for(model: str, data: str | None) -> str:
    """The data set ``model`` trains on: ``data``, else the paper's; checked against its task.

    ``ConfigError`` when the model has no default data set, or when the data set
    is registered for another task (checked by name: nothing is loaded).
    """
    arch = get_architecture(model)
    name = data if data is not None else paper_settings(model).data
    if name is None:
        raise ConfigError(
            f"model {model!r} has no default data set",
            "name one with --data (a registered data set or package.module:loader)",
        )
    entry = resolve_dataset(name)
    if entry.task is not None and entry.task is not arch.task:
        raise ConfigError(
            f"model {model!r} is a {arch.task.value} model, data set {entry.name!r} "
            f"is for {entry.task.value}",
            "pick a data set of the model's task (e.g. transformer with wikitext2)",
        )
    return name


def local_training(
    model: str, epochs: int | None = None, batch_size: int | None = None
) -> LocalTrainingConfig:
    """The paper's local training for ``model``, with ``epochs`` or ``batch_size`` if given."""
    local = paper_settings(model).local
    return replace(
        local,
        epochs=local.epochs if epochs is None else epochs,
        batch_size=local.batch_size if batch_size is None else batch_size,
    )


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a run depends on; what is left None is the paper's for the model.

    ``model``: a registered name or ``package.module:factory``; ``data``: a data
    set name or ``package.module:loader`` (None: the model's own, see
    ``PAPER_SETTINGS``). ``lr``, ``local``, ``rounds`` and ``milestones``
    default to the model's row of the paper's Table 6 (read them resolved as
    ``learning_rate``, ``local_training``, ``total_rounds``, ``lr_milestones``).
    """

    model: str = "conv"
    mode: str = "a-e"
    assignment: str | None = None
    split: Split = Split.iid
    rounds: int | None = None
    num_clients: int = 100
    fraction: float = 0.1
    lr: float | None = None
    milestones: tuple[int, ...] | None = None
    lr_factor: float = 0.1
    local: LocalTrainingConfig | None = None
    shards_per_client: int = 2
    stats_clients: StatsClients = StatsClients.all
    seed: int = 0
    train_examples: int | None = None
    test_examples: int | None = None
    submodel: Submodel = Submodel.static
    data: str | None = None

    def __post_init__(self) -> None:
        """Refuse impossible settings before any data is loaded."""
        arch = get_architecture(self.model)  # ConfigError listing the choices if unknown
        if arch.task is TaskKind.language_model and self.split is not Split.iid:
            raise ConfigError(
                f"model {self.model!r} is a language model, split IID only (as in the paper)",
                "use --split iid",
            )
        dataset_for(self.model, self.data)
        if self.total_rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.total_rounds}")
        if self.num_clients < 1:
            raise ConfigError(f"need at least one client, got {self.num_clients}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"fraction {self.fraction} is outside (0, 1]",
                "it is the share of clients per round",
            )
        if self.local_training.epochs < 1 or self.local_training.batch_size < 1:
            raise ConfigError("local epochs and batch size must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning rate must be positive, got {self.learning_rate}")
        parse_mode(self.mode, self.assignment)

    @property
    def paper(self) -> PaperSettings:
        return paper_settings(self.model)

    @property
    def metric(self) -> str:
        """What the run reports: ``accuracy``, or ``perplexity`` for a language model."""
        return task_for(get_architecture(self.model)).metric

    @property
    def data_name(self) -> str | None:
        return self.data if self.data is not None else self.paper.data

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else self.paper.lr

    @property
    def local_training(self) -> LocalTrainingConfig:
        return self.local if self.local is not None else self.paper.local

    @property
    def total_rounds(self) -> int:
        return self.rounds if self.rounds is not None else self.paper.rounds[self.split]

    @property
    def lr_milestones(self) -> tuple[int, ...]:
        return self.milestones if self.milestones is not None else self.paper.milestones[self.split]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(split=self.split.value, stats_clients=self.stats_clients.value)
        data.update(submodel=self.submodel.value)
        data.update(rounds=self.total_rounds, milestones=list(self.lr_milestones))
        data.update(lr=self.learning_rate, local=asdict(self.local_training))
        data.update(data=self.data_name)
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
    global_perplexity: float | None = None  # the language model's metric (None otherwise)


@dataclass
class SimulationResult:
    config: SimulationConfig
    initial_accuracy: float
    rounds: list[RoundRecord]
    global_state: dict[str, torch.Tensor]
    initial_perplexity: float | None = None

    def to_json(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "config": self.config.to_json(),
            "initial_global_accuracy": self.initial_accuracy,
        }
        if self.initial_perplexity is not None:
            report["initial_global_perplexity"] = self.initial_perplexity
        report["rounds"] = [asdict(r) for r in self.rounds]
        return report


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

    def all_silent(self, clients: Sequence[str]) -> bool:
        return not clients

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


def load_data(config: SimulationConfig, data_dir: str | Path | None) -> TaskData:
    """``config``'s data set from ``data_dir``, shaped for its model where the loader can be.

    ``ConfigError`` when the data does not fit the model (task, input shape, classes).
    """
    arch = get_architecture(config.model)
    name = config.data_name
    assert name is not None  # the config refuses a run without a data set
    data = get_dataset(name, data_dir, fit_to=arch.input_shape)
    check_compatible(arch, data)
    return data


def _inputs_placed(inputs: torch.Tensor, device: str) -> torch.Tensor:
    """Inputs on ``device``; image batches in its memory format (channels-last on a CPU)."""
    inputs = inputs.to(device)
    if inputs.dim() == 4:
        return inputs.contiguous(memory_format=memory_format(device))
    return inputs.contiguous()


def run_simulation(
    config: SimulationConfig,
    data: TaskData,
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
    check_compatible(arch, data)
    task = task_for(arch)
    mix = parse_mode(config.mode, config.assignment)
    split = task.split(
        data,
        config.num_clients,
        config.split,
        config.seed,
        config.shards_per_client,
        config.train_examples,
        config.test_examples,
    )
    train_x, train_y = (t[torch.from_numpy(split.train_keep)] for t in (data.train_x, data.train_y))
    test_x, test_y = (t[torch.from_numpy(split.test_keep)] for t in (data.test_x, data.test_y))
    train_parts, test_parts = split.train, split.test
    strategy = HeteroFLStrategy(
        arch.spec,
        mix,
        config.num_clients,
        config.fraction,
        MultiStepSchedule(config.learning_rate, config.lr_milestones, config.lr_factor),
        config.seed,
        config.submodel,
    )
    evaluation_model = place(arch.build(mix.global_rate, mix.global_rate), device)
    has_statistics = any(isinstance(m, StaticBatchNorm2d) for m in evaluation_model.modules())
    test_x_placed = _inputs_placed(test_x, device)
    # Non-IID: each client's test examples, scored under its label mask (local accuracy).
    local_parts = (
        [
            (indices, label_mask(labels, data.num_classes))
            for indices, labels in zip(test_parts.indices, train_parts.labels, strict=True)
        ]
        if test_parts is not None
        else []
    )

    def initial_state() -> dict[str, torch.Tensor]:
        torch.manual_seed(config.seed)
        model = arch.build(mix.global_rate, mix.global_rate)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test(state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        evaluation_model.load_state_dict(state)
        overall, parts = task.evaluate_parts(
            evaluation_model, test_x_placed, test_y.to(device), local_parts
        )
        local = None
        if test_parts is not None:
            correct = sum(part.accuracy * part.num_examples for part in parts)
            local = correct / max(sum(part.num_examples for part in parts), 1)
        return {
            "global_loss": overall.loss,
            "global_accuracy": overall.accuracy,
            "local_accuracy": local,
            f"global_{task.metric}": task.metric_of(overall),
        }

    records: list[RoundRecord] = []

    def record(result: RoundResult) -> None:
        evaluation = result.evaluation
        train_seconds = result.seconds["training"]
        samples = result.train_samples * config.local_training.epochs
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
            global_perplexity=evaluation.get("global_perplexity"),
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
        arch,
        mix.global_rate,
        backend,
        train_parts,
        data.num_classes,
        config.local_training,
        on_client,
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
        has_statistics=has_statistics,
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
        config,
        float(initial.get("global_accuracy") or 0.0),
        records,
        engine.global_state,
        initial.get("global_perplexity"),
    )
