"""Tasks: how a model of each kind is split across clients, trained and scored.

A round engine asks ``task_for(arch)`` once and then calls the same methods
whatever the model:

* ``task.split(data, num_clients, split, seed)``: who holds which examples,
  and the labels each holds (for label masks and the label split);
* ``task.train_local(model, x, y, lr, config, mask, seed)``: one local session;
* ``task.evaluate(model, x, y, mask)``: loss, accuracy and perplexity;
* ``task.evaluate_parts(model, x, y, parts)``: the same over the whole set and
  over each client's part of it under its label mask (local accuracy);
* ``task.metric`` / ``task.metric_of(result)``: the figure to report
  (accuracy for classification, perplexity for the language model).

Classification is ``heterofl_edge.training`` unchanged. The masked language
model (paper section 4, Table 6) replaces a Bernoulli(0.15) share of the
input tokens by the mask token (id ``num_tokens``), a fresh draw every step
from ``heterofl_edge.masking`` (the draws devices make too), and scores the
predictions; perplexity is ``exp(mean loss)``. Which positions count is a
choice (``ScoredPositions``): the masked ones (the default) or all of them,
as the paper's official code computes its loss and its perplexity, which is
why its perplexities are small: most positions see their own token. The
language model is split IID only, as in the paper.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from heterofl_edge.batching import epoch_batches
from heterofl_edge.data.base import TaskData
from heterofl_edge.errors import ConfigError
from heterofl_edge.loss import masked_cross_entropy
from heterofl_edge.masking import IGNORE_INDEX, ScoredPositions, TokenMasker
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.partition import (
    FederatedSplit,
    Split,
    federated_split,
    held_out_examples,
    stretch_partition,
)
from heterofl_edge.task_kind import TaskKind
from heterofl_edge.training import (
    EVAL_BATCH,
    EvalResult,
    LocalTrainingConfig,
    LocalTrainingResult,
    evaluate,
    predict,
    score_logits,
    train_local,
)

__all__ = [
    "IGNORE_INDEX",
    "ClassificationTask",
    "LanguageModelTask",
    "ScoredPositions",
    "Task",
    "TaskKind",
    "check_compatible",
    "task_for",
]

# Evaluation batches hold at most this many logits (64 MB of float32).
LOGITS_PER_BATCH = 1 << 24


class Task(ABC):
    """What a round engine needs to know about a kind of model."""

    kind: ClassVar[TaskKind]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    @abstractmethod
    def train_local(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        lr: float,
        config: LocalTrainingConfig,
        mask: torch.Tensor | None = None,
        seed: int = 0,
    ) -> LocalTrainingResult:
        """Train ``model`` in place on one client's examples (batches: ``epoch_batches(seed)``)."""

    @abstractmethod
    def evaluate(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> EvalResult:
        """Loss, accuracy (and so perplexity) of ``model`` in evaluation mode."""

    def held_out(self, count: int, limit: int | None, seed: int) -> np.ndarray:
        """Which of ``count`` test examples a run with ``seed`` scores, ``limit`` of them."""
        return held_out_examples(count, limit, seed)

    @abstractmethod
    def split(
        self,
        data: TaskData,
        num_clients: int,
        split: Split,
        seed: int,
        shards_per_client: int = 2,
        train_examples: int | None = None,
        test_examples: int | None = None,
    ) -> FederatedSplit:
        """Which client holds which training (and, non-IID, test) examples, from the seed."""

    def evaluate_parts(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        parts: Sequence[tuple[np.ndarray, torch.Tensor]] = (),
    ) -> tuple[EvalResult, list[EvalResult]]:
        """``evaluate`` over all examples, then over each part (indices, label mask) of them."""
        overall = self.evaluate(model, inputs, targets)
        return overall, [
            self.evaluate(model, inputs[torch.from_numpy(i)], targets[torch.from_numpy(i)], m)
            for i, m in parts
        ]

    def metric_of(self, result: EvalResult | LocalTrainingResult) -> float:
        """The figure this task reports for ``result``."""
        return float(getattr(result, self.metric))


class ClassificationTask(Task):
    """Labels [N]; logits [N, C]; metric accuracy. IID and non-IID (shard) splits."""

    kind = TaskKind.classification
    metric = "accuracy"
    higher_is_better = True

    def train_local(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        lr: float,
        config: LocalTrainingConfig,
        mask: torch.Tensor | None = None,
        seed: int = 0,
    ) -> LocalTrainingResult:
        return train_local(model, inputs, targets, lr, config, mask, seed)

    def evaluate(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> EvalResult:
        return evaluate(model, inputs, targets, mask, batch_size or EVAL_BATCH)

    def evaluate_parts(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        parts: Sequence[tuple[np.ndarray, torch.Tensor]] = (),
    ) -> tuple[EvalResult, list[EvalResult]]:
        """One forward pass over all examples; each part is scored from the same logits."""
        return self.score_parts(predict(model, inputs), targets, parts)

    def score_parts(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        parts: Sequence[tuple[np.ndarray, torch.Tensor]] = (),
    ) -> tuple[EvalResult, list[EvalResult]]:
        """``evaluate_parts`` from the logits of all examples, computed elsewhere."""
        logits, targets = logits.cpu(), targets.cpu()
        return score_logits(logits, targets), [
            score_logits(logits[i], targets[i], mask) for i, mask in parts
        ]

    def split(
        self,
        data: TaskData,
        num_clients: int,
        split: Split,
        seed: int,
        shards_per_client: int = 2,
        train_examples: int | None = None,
        test_examples: int | None = None,
    ) -> FederatedSplit:
        return federated_split(
            data.train_y.numpy(),
            data.test_y.numpy(),
            num_clients,
            split,
            data.num_classes,
            seed,
            shards_per_client,
            train_examples,
            test_examples,
        )


@dataclass(frozen=True)
class _Corrupted:
    inputs: torch.Tensor
    targets: torch.Tensor
    scored: int


class LanguageModelTask(Task):
    """Token rows [N, S]; logits [N, S, V]; masked-LM training; metric perplexity; IID only."""

    kind = TaskKind.language_model
    metric = "perplexity"
    higher_is_better = False

    def __init__(
        self,
        num_tokens: int,
        mask_rate: float = 0.15,
        positions: ScoredPositions = ScoredPositions.masked,
        eval_seed: int = 0,
    ) -> None:
        if not 0.0 < mask_rate < 1.0:
            raise ConfigError(f"mask rate {mask_rate} is outside (0, 1)")
        self.num_tokens = num_tokens
        self.mask_rate = mask_rate
        self.positions = ScoredPositions(positions)
        self.eval_seed = eval_seed

    def masker(self, seed: int) -> TokenMasker:
        """The masks of one local session (or evaluation) seeded with ``seed``."""
        return TokenMasker(self.num_tokens, self.mask_rate, self.positions, seed)

    def corrupt(self, rows: torch.Tensor, masker: TokenMasker) -> _Corrupted:
        """Masked inputs and the targets to score (``IGNORE_INDEX`` where nothing is scored)."""
        # masked with numpy on the CPU, as devices mask: the same tokens on any device
        masked = masker.corrupt(rows.cpu().numpy())
        return _Corrupted(
            torch.from_numpy(masked.inputs).to(rows.device),
            torch.from_numpy(masked.targets).to(rows.device),
            masked.scored,
        )

    def train_local(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        lr: float,
        config: LocalTrainingConfig,
        mask: torch.Tensor | None = None,
        seed: int = 0,
    ) -> LocalTrainingResult:
        """Masked-LM SGD on one client's rows (``targets`` are the rows themselves)."""
        optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        model.train()
        masker = self.masker(seed)
        steps, loss_sum, correct, scored = 0, 0.0, 0, 0
        # inputs and targets are the same rows: the inputs are masked here
        for indices in epoch_batches(len(targets), config.epochs, config.batch_size, seed):
            batch = self.corrupt(targets[torch.from_numpy(indices)], masker)
            if batch.scored == 0:  # nothing masked in this batch: no loss to take a step on
                continue
            logits = model(batch.inputs)
            loss = masked_cross_entropy(logits, batch.targets, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
            optimizer.step()
            steps += 1
            loss_sum += float(loss.detach()) * batch.scored
            correct += _correct(logits.detach(), batch.targets, mask)
            scored += batch.scored
        return LocalTrainingResult(
            len(targets), steps, loss_sum / max(scored, 1), correct / max(scored, 1)
        )

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> EvalResult:
        """Mean loss over the scored positions of all rows, masks drawn from ``eval_seed``."""
        model.eval()
        masker = self.masker(self.eval_seed)
        per_row = int(targets[0].numel()) if len(targets) else 1
        rows_per_batch = batch_size or max(1, LOGITS_PER_BATCH // (per_row * self.num_tokens))
        loss_sum, correct, scored = 0.0, 0, 0
        for rows in _chunks(targets, rows_per_batch):
            batch = self.corrupt(rows, masker)
            if batch.scored == 0:
                continue
            logits = model(batch.inputs)
            loss = masked_cross_entropy(logits, batch.targets, mask)
            loss_sum += float(loss) * batch.scored
            correct += _correct(logits, batch.targets, mask)
            scored += batch.scored
        if scored == 0:
            return EvalResult(len(targets), math.nan, 0.0)
        return EvalResult(len(targets), loss_sum / scored, correct / scored)

    def split(
        self,
        data: TaskData,
        num_clients: int,
        split: Split,
        seed: int,
        shards_per_client: int = 2,
        train_examples: int | None = None,
        test_examples: int | None = None,
    ) -> FederatedSplit:
        """``stretch_partition`` of the training rows, and the first test rows.

        ``test_examples`` keeps that many rows from the start of the test stream.
        """
        rows = data.train_x.numpy()
        keep, partition = stretch_partition(rows, num_clients, Split(split), seed, train_examples)
        return FederatedSplit(
            keep, self.held_out(len(data.test_x), test_examples, seed), partition, None
        )

    def held_out(self, count: int, limit: int | None, seed: int) -> np.ndarray:
        """The first ``limit`` test rows: consecutive text (the seed does not choose them)."""
        return np.arange(count if limit is None else min(limit, count))


def _chunks(rows: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _correct(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> int:
    if mask is not None:
        logits = logits * mask
    return int((logits.argmax(dim=-1) == targets).sum())


_TASKS: dict[TaskKind, Callable[[Architecture], Task]] = {
    TaskKind.classification: lambda arch: ClassificationTask(),
    TaskKind.language_model: lambda arch: LanguageModelTask(arch.num_classes),
}


def task_for(arch: Architecture) -> Task:
    """The task object that trains and scores ``arch``'s kind of model."""
    return _TASKS[arch.task](arch)


def check_compatible(arch: Architecture, data: TaskData) -> None:
    """``ConfigError`` unless ``data`` fits ``arch``: task, input shape and dtype, classes."""
    if arch.task is not data.task:
        raise ConfigError(
            f"model {arch.name!r} is a {arch.task.value} model, the data set is for "
            f"{data.task.value}",
            "pick a data set of the model's task (e.g. transformer with wikitext2)",
        )
    shape, dtype = tuple(data.train_x.shape[1:]), data.train_x.dtype
    if shape != arch.input_shape or dtype != arch.input_dtype:
        raise ConfigError(
            f"model {arch.name!r} takes inputs {arch.input_shape} {arch.input_dtype}, "
            f"the data set has {shape} {dtype}",
            "for an image folder, load it with the model's size and channels "
            "(e.g. size=28, channels=1 for conv)",
        )
    if data.num_classes != arch.num_classes:
        raise ConfigError(
            f"model {arch.name!r} has {arch.num_classes} outputs, the data set "
            f"{data.num_classes} classes",
            "build the model for the data set's classes (or vocabulary)",
        )
