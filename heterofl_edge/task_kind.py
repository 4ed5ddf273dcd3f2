"""The kinds of learning task a model can serve (torch-free, imported by models and data)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["TaskKind"]


class TaskKind(StrEnum):
    """What a model's outputs mean, and so how it is trained and scored."""

    classification = "classification"  # logits [N, C] for labels [N]; metric: accuracy
    # masked language model: token ids [N, S] in, logits [N, S, V] out; ids 0..V-1 are
    # words and id V is the mask token; metric: perplexity
    language_model = "language-model"
