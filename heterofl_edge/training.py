"""Local training and evaluation of one (sub-)model: plain PyTorch, no I/O.

Local training follows the paper and the official code: E epochs of SGD with
momentum and weight decay over shuffled mini-batches, masked cross-entropy,
gradient norm clipped to 1, and a fresh optimizer (zero momentum) for every
local session.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from heterofl_edge.batching import epoch_batches
from heterofl_edge.loss import masked_cross_entropy

__all__ = [
    "EVAL_BATCH",
    "EvalResult",
    "LocalTrainingConfig",
    "LocalTrainingResult",
    "evaluate",
    "train_local",
]


@dataclass(frozen=True)
class LocalTrainingConfig:
    """Hyperparameters of one local session (the paper's MNIST values by default)."""

    epochs: int = 5
    batch_size: int = 10
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip_grad_norm: float | None = 1.0


@dataclass(frozen=True)
class LocalTrainingResult:
    num_examples: int
    steps: int
    mean_loss: float
    accuracy: float

    @property
    def perplexity(self) -> float:
        """``exp(mean_loss)``: the language model's metric."""
        return _perplexity(self.mean_loss)


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float

    @property
    def perplexity(self) -> float:
        """``exp(loss)``: the language model's metric."""
        return _perplexity(self.loss)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    config: LocalTrainingConfig,
    mask: torch.Tensor | None = None,
    seed: int = 0,
) -> LocalTrainingResult:
    """Train ``model`` in place on one client's data; return its training metrics.

    Batches come from ``heterofl_edge.batching.epoch_batches(seed)``, as on a device.
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    model.train()
    n = images.shape[0]
    steps, loss_sum, correct, seen = 0, 0.0, 0, 0
    for indices in epoch_batches(n, config.epochs, config.batch_size, seed):
        batch = torch.from_numpy(indices)
        x, y = images[batch], labels[batch]
        logits = model(x)
        loss = masked_cross_entropy(logits, y, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        optimizer.step()
        steps += 1
        loss_sum += float(loss.detach()) * len(batch)
        masked = logits if mask is None else logits * mask
        correct += int((masked.argmax(dim=1) == y).sum())
        seen += len(batch)
    return LocalTrainingResult(n, steps, loss_sum / max(seen, 1), correct / max(seen, 1))


EVAL_BATCH = 100


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits of ``model`` in evaluation mode for all ``images``.

    Evaluation-mode results do not depend on the batch size; batches of 100 ran
    level-a conv 1.8x faster per image than batches of 1,000 on the project's CPU
    (``bench/results/round_floor.json``), with the same logits.
    """
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    batch_size: int = EVAL_BATCH,
) -> EvalResult:
    """Loss and accuracy in evaluation mode (with ``mask`` applied, for local accuracy)."""
    return score_logits(predict(model, images, batch_size), labels, mask)


def score_logits(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> EvalResult:
    """Loss and accuracy of precomputed logits."""
    if mask is not None:
        logits = logits * mask
    loss = float(masked_cross_entropy(logits, labels)) if len(labels) else 0.0
    accuracy = float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else 0.0
    return EvalResult(len(labels), loss, accuracy)
