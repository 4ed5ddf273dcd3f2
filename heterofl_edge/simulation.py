"""In-process HeteroFL: the whole federation in one Python process.

The rounds run on the round engine (``heterofl_edge.engine``) with an
in-process transport: each selected client receives the upper-left slice of
the global model for its level, trains it locally, and its update goes into
the engine's streaming aggregator. Then the clients report sBN statistics
computed with the global model, and the global model is evaluated on the test
set (and, for non-IID splits, on each client's labels: local accuracy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import torch

from heterofl_edge.assignment import parse_mode
from heterofl_edge.batching import stats_batches
from heterofl_edge.bn_stats import collect_moments
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
from heterofl_edge.loss import label_mask
from heterofl_edge.models import Architecture, get_architecture
from heterofl_edge.partition import Partition, Split, federated_split
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule
from heterofl_edge.training import LocalTrainingConfig, predict, score_logits, train_local

__all__ = ["RoundRecord", "SimulationConfig", "SimulationResult", "Split", "run_simulation"]


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
        data.update(rounds=self.total_rounds, milestones=list(self.lr_milestones))
        return data


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


class _InProcessTransport:
    """Clients as local objects: each task runs when the engine asks for replies."""

    def __init__(
        self,
        arch: Architecture,
        global_rate: float,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        parts: Partition,
        masks: list[torch.Tensor],
        local: LocalTrainingConfig,
        on_client: Callable[[int, int], None] | None,
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.train_x, self.train_y = train_x, train_y
        self.parts = parts
        self.masks = masks
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
            model = self.arch.build(self.global_rate, self.global_rate)
            model.load_state_dict(self._state)
            for task in self._tasks:
                local = self.train_x[self.parts.indices[task.position]]
                batches = (local[s] for s in stats_batches(len(local)))
                yield StatsReply(task.client, collect_moments(model, batches))
            return
        for done, task in enumerate(self._tasks, start=1):
            yield self._train(task)
            if self.on_client:
                self.on_client(done, len(self._tasks))

    def _train(self, task: Task) -> TrainReply:
        start = time.perf_counter()
        model = self.arch.build(task.rate, self.global_rate)
        model.load_state_dict(
            extract_submodel_state(self._state, self.arch.spec, task.rate, self.global_rate)
        )
        idx = self.parts.indices[task.position]
        torch.manual_seed(task.seed)  # any randomness in training (dropout) follows the task
        result = train_local(
            model,
            self.train_x[idx],
            self.train_y[idx],
            task.lr,
            self.local,
            self.masks[task.position],
            task.seed,
        )
        return TrainReply(
            task.client,
            {n: p.detach() for n, p in model.named_parameters()},
            tuple(self.parts.labels[task.position]),
            result.num_examples,
            {"loss": result.mean_loss, "accuracy": result.accuracy},
            time.perf_counter() - start,
        )

    def silent(self, clients: Sequence[str]) -> set[str]:
        return set()

    def close_phase(self, round_number: int, phase: Phase) -> list[TrainReply | StatsReply]:
        return []

    def stopping(self) -> bool:
        return False


class _MemoryJournal:
    """A simulation keeps its checkpoints in memory (nothing to resume)."""

    def resume(self) -> None:
        return None

    def round_opened(self, opened: RoundOpen) -> None:
        return None

    def training_closed(self, opened: RoundOpen, state: dict[str, torch.Tensor]) -> None:
        return None

    def round_finished(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        return None


def run_simulation(
    config: SimulationConfig,
    data: ClassificationData,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_client: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Run ``config`` on ``data`` and return every round's record and the final state.

    The rounds run on ``heterofl_edge.engine.RoundEngine``, the engine the
    coordinator runs too, with clients in this process. ``on_round`` gets each
    round's record as it ends; ``on_client`` gets (clients done, clients in the
    round) as a round progresses.
    """
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
    )
    evaluation_model = arch.build(mix.global_rate, mix.global_rate)

    def initial_state() -> dict[str, torch.Tensor]:
        torch.manual_seed(config.seed)
        model = arch.build(mix.global_rate, mix.global_rate)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def test(state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        evaluation_model.load_state_dict(state)
        logits = predict(evaluation_model, test_x)
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
        )
        records.append(entry)
        if on_round:
            on_round(entry)

    transport = _InProcessTransport(
        arch, mix.global_rate, train_x, train_y, train_parts, masks, config.local, on_client
    )
    engine = RoundEngine(
        strategy,
        EngineSettings(
            rounds=config.total_rounds,
            min_clients=config.num_clients,
            statistics=StatisticsClients(config.stats_clients.value),
        ),
        transport,
        _MemoryJournal(),
        initial_state,
        time.perf_counter,
        evaluate=test,
        on_round=record,
    )
    initial = engine.initial_statistics(transport.wait_for_clients(0))
    engine.run()
    return SimulationResult(
        config, float(initial.get("global_accuracy") or 0.0), records, engine.global_state
    )
