"""``Architecture``: everything heterofl-edge knows about one model family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from heterofl_edge.errors import InternalError
from heterofl_edge.models.autospec import SpecInference
from heterofl_edge.models.interface import TaskKind
from heterofl_edge.slicing import SlicingSpec

__all__ = ["Architecture"]


@dataclass(frozen=True)
class Architecture:
    """One model family: its factory, slicing spec, input shape and task.

    ``factory(width, scaler_rate)`` builds the model of width ``width`` whose
    Scalers divide by ``scaler_rate`` while training. ``source`` says where the
    family came from: ``built-in``, ``entry point (DISTRIBUTION)`` or ``module:factory``;
    ``inference`` holds the evidence for a spec inferred from shapes (None when
    the spec is hand-written).
    """

    name: str
    description: str
    factory: Callable[[float, float], nn.Module]
    spec: SlicingSpec
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int
    task: TaskKind = TaskKind.classification
    source: str = "built-in"
    inference: SpecInference | None = None

    def build(self, rate: float = 1.0, global_rate: float = 1.0) -> nn.Module:
        """The model of width ``rate`` whose Scaler divides by ``rate / global_rate``."""
        if not 0.0 < rate <= global_rate <= 1.0:
            raise InternalError(f"need 0 < rate <= global rate <= 1, got {rate} and {global_rate}")
        return self.factory(rate, rate / global_rate)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of zeros of the model's input shape and dtype."""
        return torch.zeros((batch_size, *self.input_shape), dtype=self.input_dtype)
