"""Width-scalable models and their slicing specs, by name.

``get_architecture("conv")`` returns everything heterofl-edge knows about one
architecture: how to build it at a width, its slicing spec, its input shape
and its task. ``build_model`` is the short form for the model alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

import torch
from torch import nn

from heterofl_edge.errors import ConfigError, InternalError
from heterofl_edge.models.conv import ConvNet, conv_spec
from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d
from heterofl_edge.models.resnet import ResNet18, resnet18_spec
from heterofl_edge.models.transformer import (
    TRANSFORMER_DEFAULTS,
    MaskedLanguageTransformer,
    mask_tokens,
    transformer_spec,
)
from heterofl_edge.slicing import SlicingSpec

__all__ = [
    "Architecture",
    "ConvNet",
    "MaskedLanguageTransformer",
    "ModelName",
    "ResNet18",
    "Scaler",
    "StaticBatchNorm2d",
    "build_model",
    "get_architecture",
    "mask_tokens",
]


class ModelName(StrEnum):
    conv = "conv"
    resnet18 = "resnet18"
    transformer = "transformer"


@dataclass(frozen=True)
class Architecture:
    """One model family: its factory, slicing spec, input shape and task."""

    name: str
    description: str
    factory: Callable[[float, float], nn.Module]
    spec: SlicingSpec
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    num_classes: int

    def build(self, rate: float = 1.0, global_rate: float = 1.0) -> nn.Module:
        """The model of width ``rate`` whose Scaler divides by ``rate / global_rate``."""
        if not 0.0 < rate <= global_rate <= 1.0:
            raise InternalError(f"need 0 < rate <= global rate <= 1, got {rate} and {global_rate}")
        return self.factory(rate, rate / global_rate)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of zeros of the model's input shape and dtype."""
        return torch.zeros((batch_size, *self.input_shape), dtype=self.input_dtype)


@cache
def get_architecture(name: str | ModelName) -> Architecture:
    """The architecture called ``name``; ``ConfigError`` if there is none."""
    key = name.value if isinstance(name, ModelName) else str(name)
    if key == "conv":
        return Architecture(
            "conv",
            "CNN for MNIST (paper Table 7)",
            lambda w, s: ConvNet(w, s),
            conv_spec(),
            (1, 28, 28),
            torch.float32,
            10,
        )
    if key == "resnet18":
        return Architecture(
            "resnet18",
            "pre-activation ResNet18 for CIFAR10 (paper Table 8)",
            lambda w, s: ResNet18(w, s),
            resnet18_spec(),
            (3, 32, 32),
            torch.float32,
            10,
        )
    if key == "transformer":
        vocabulary = int(TRANSFORMER_DEFAULTS["num_tokens"])
        return Architecture(
            "transformer",
            "masked-LM Transformer for WikiText2 (paper Table 9)",
            lambda w, s: MaskedLanguageTransformer(w, s),
            transformer_spec(vocabulary),
            (int(TRANSFORMER_DEFAULTS["sequence_length"]),),
            torch.long,
            vocabulary,
        )
    choices = ", ".join(m.value for m in ModelName)
    raise ConfigError(f"unknown model {key!r}", f"choose one of: {choices}")


def build_model(name: str | ModelName, rate: float = 1.0, global_rate: float = 1.0) -> nn.Module:
    """Shorthand for ``get_architecture(name).build(rate, global_rate)``."""
    return get_architecture(name).build(rate, global_rate)
