"""The two shapes of data set the toolkit trains on, and their checks.

Every data set, built-in or brought by a user, is one of these. Both expose
``train_x``, ``train_y``, ``test_x``, ``test_y``, ``num_classes`` and ``task``,
so that a round engine can split, train and evaluate without asking which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from heterofl_edge.data.checksums import md5_of
from heterofl_edge.errors import DataError
from heterofl_edge.task_kind import TaskKind

__all__ = ["ClassificationData", "LanguageModelData", "TaskData", "md5_of", "validate_data"]


@dataclass(frozen=True)
class ClassificationData:
    """Normalised inputs [N, ...] float32 and labels [N] int64, train and test.

    ``classes`` names the labels 0..num_classes-1 where the data set knows them.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] = ()

    task: ClassVar[TaskKind] = TaskKind.classification

    @property
    def train_x(self) -> torch.Tensor:
        return self.train_images

    @property
    def train_y(self) -> torch.Tensor:
        return self.train_labels

    @property
    def test_x(self) -> torch.Tensor:
        return self.test_images

    @property
    def test_y(self) -> torch.Tensor:
        return self.test_labels


@dataclass(frozen=True)
class LanguageModelData:
    """A token stream cut into rows of ``sequence_length`` ids [N, S] int64, per split.

    Ids index ``vocabulary``; a masked language model's mask token is the id
    ``num_classes`` (one past the vocabulary). Inputs and targets are the same
    rows: the task masks the inputs while training.
    """

    train_tokens: torch.Tensor
    valid_tokens: torch.Tensor
    test_tokens: torch.Tensor
    vocabulary: tuple[str, ...]

    task: ClassVar[TaskKind] = TaskKind.language_model

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    @property
    def sequence_length(self) -> int:
        return int(self.train_tokens.shape[1])

    @property
    def train_x(self) -> torch.Tensor:
        return self.train_tokens

    @property
    def train_y(self) -> torch.Tensor:
        return self.train_tokens

    @property
    def test_x(self) -> torch.Tensor:
        return self.test_tokens

    @property
    def test_y(self) -> torch.Tensor:
        return self.test_tokens


TaskData = ClassificationData | LanguageModelData


def validate_data(data: object, name: str) -> TaskData:
    """``data`` if it is a well-formed data set; else ``DataError`` saying what is wrong."""
    if not isinstance(data, ClassificationData | LanguageModelData):
        raise DataError(
            f"data set {name!r} is a {type(data).__name__}",
            "a loader returns heterofl_edge.data.ClassificationData or LanguageModelData",
        )
    if isinstance(data, LanguageModelData):
        splits = {"train": data.train_tokens, "valid": data.valid_tokens, "test": data.test_tokens}
        for split, rows in splits.items():
            if rows.dtype != torch.long or rows.dim() != 2:
                raise DataError(
                    f"{name}: {split} tokens are {rows.dtype} {tuple(rows.shape)}",
                    "token rows are int64 [N, sequence_length]",
                )
            if rows.shape[1] != data.sequence_length:
                raise DataError(f"{name}: {split} rows are not {data.sequence_length} tokens long")
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= data.num_classes):
                raise DataError(
                    f"{name}: {split} holds ids outside the vocabulary 0..{data.num_classes - 1}"
                )
        if len(data.train_tokens) == 0:
            raise DataError(f"{name}: no training rows")
        return data
    for split, x, y in (
        ("train", data.train_images, data.train_labels),
        ("test", data.test_images, data.test_labels),
    ):
        if y.dtype != torch.long or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{name}: {split} inputs {tuple(x.shape)} and labels {y.dtype} "
                f"{tuple(y.shape)} do not match",
                "inputs are [N, ...] and labels int64 [N]",
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise DataError(f"{name}: {split} labels lie outside 0..{data.num_classes - 1}")
    if data.train_images.shape[1:] != data.test_images.shape[1:]:
        raise DataError(
            f"{name}: training inputs are {tuple(data.train_images.shape[1:])}, "
            f"test inputs {tuple(data.test_images.shape[1:])}"
        )
    if len(data.train_labels) == 0:
        raise DataError(f"{name}: no training examples")
    return data
