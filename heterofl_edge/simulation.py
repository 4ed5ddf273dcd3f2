"""In-process HeteroFL: the whole federation in one Python process.

One round (paper Algorithm 1): the strategy selects clients and their levels;
each client receives the upper-left slice of the global model for its level,
trains it locally, and its update is added to the streaming aggregator; the
aggregate becomes the new global model. Then the clients report sBN
statistics computed with the global model, and the global model is evaluated
on the test set (and, for non-IID splits, on each client's labels: local
accuracy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from heterofl_edge.assignment import parse_mode
from heterofl_edge.batching import stats_batches
from heterofl_edge.bn_stats import apply_statistics, collect_moments, combine_moments
from heterofl_edge.data import ClassificationData
from heterofl_edge.errors import ConfigError
from heterofl_edge.levels import rate_label
from heterofl_edge.loss import label_mask
from heterofl_edge.models import get_architecture
from heterofl_edge.partition import Split, federated_split
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule
from heterofl_edge.training import LocalTrainingConfig, predict, score_logits, train_local

__all__ = ["RoundRecord", "SimulationConfig", "SimulationResult", "Split", "run_simulation"]


class StatsClients(StrEnum):
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


def run_simulation(
    config: SimulationConfig,
    data: ClassificationData,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_client: Callable[[int, int], None] | None = None,
) -> SimulationResult:
    """Run ``config`` on ``data`` and return every round's record and the final state.

    ``on_round`` gets each round's record as it ends; ``on_client`` gets
    (clients done, clients in the round) as a round progresses.
    """
    arch = get_architecture(config.model)
    mix = parse_mode(config.mode, config.assignment)
    torch.manual_seed(config.seed)
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

    strategy = HeteroFLStrategy(
        arch.spec,
        mix,
        config.num_clients,
        config.fraction,
        MultiStepSchedule(config.lr, config.lr_milestones, config.lr_factor),
        config.seed,
    )
    global_model = arch.build(mix.global_rate, mix.global_rate)
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    masks = [label_mask(labels, data.num_classes) for labels in train_parts.labels]

    def refresh_statistics(
        state: dict[str, torch.Tensor], clients: list[int]
    ) -> dict[str, torch.Tensor]:
        global_model.load_state_dict(state)
        reports = []
        for c in clients:
            local = train_x[train_parts.indices[c]]
            batches = (local[s] for s in stats_batches(len(local)))
            reports.append(collect_moments(global_model, batches))
        return apply_statistics(state, combine_moments(reports))

    def test(state: dict[str, torch.Tensor]) -> tuple[float, float, float | None]:
        global_model.load_state_dict(state)
        logits = predict(global_model, test_x)
        overall = score_logits(logits, test_y)
        local = None
        if test_parts is not None:
            correct = total = 0.0
            for c, idx in enumerate(test_parts.indices):
                part = score_logits(logits[idx], test_y[idx], masks[c])
                correct += part.accuracy * part.num_examples
                total += part.num_examples
            local = correct / max(total, 1)
        return overall.loss, overall.accuracy, local

    all_clients = list(range(config.num_clients))
    global_state = refresh_statistics(global_state, all_clients)
    initial_accuracy = test(global_state)[1]

    records = []
    for round_number in range(1, config.total_rounds + 1):
        round_start = time.perf_counter()
        plan = strategy.configure_round(round_number)
        aggregator = strategy.aggregator(global_state)
        losses, accuracies, samples = [], [], 0
        for done, task in enumerate(plan.tasks, start=1):
            local_model = arch.build(task.rate, mix.global_rate)
            local_model.load_state_dict(
                extract_submodel_state(global_state, arch.spec, task.rate, mix.global_rate)
            )
            idx = train_parts.indices[task.client_id]
            result = train_local(
                local_model,
                train_x[idx],
                train_y[idx],
                plan.lr,
                config.local,
                masks[task.client_id],
                task.seed,
            )
            trained = {n: p.detach() for n, p in local_model.named_parameters()}
            aggregator.add(trained, task.rate, train_parts.labels[task.client_id])
            losses.append(result.mean_loss)
            accuracies.append(result.accuracy)
            samples += result.num_examples * config.local.epochs
            if on_client:
                on_client(done, len(plan.tasks))
        train_seconds = time.perf_counter() - round_start
        global_state = aggregator.finalize()
        stats_from = (
            all_clients
            if config.stats_clients is StatsClients.all
            else [t.client_id for t in plan.tasks]
        )
        global_state = refresh_statistics(global_state, stats_from)
        g_loss, g_acc, l_acc = test(global_state)
        levels: dict[str, int] = {}
        for task in plan.tasks:
            levels[rate_label(task.rate)] = levels.get(rate_label(task.rate), 0) + 1
        record = RoundRecord(
            round=round_number,
            lr=plan.lr,
            levels=dict(sorted(levels.items())),
            train_loss=float(np.mean(losses)),
            train_accuracy=float(np.mean(accuracies)),
            global_loss=g_loss,
            global_accuracy=g_acc,
            local_accuracy=l_acc,
            train_seconds=train_seconds,
            round_seconds=time.perf_counter() - round_start,
            train_samples=samples,
            samples_per_second=samples / max(train_seconds, 1e-9),
        )
        records.append(record)
        if on_round:
            on_round(record)
    return SimulationResult(config, initial_accuracy, records, global_state)
