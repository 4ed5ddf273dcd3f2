"""Width-scalable models, their slicing specs, and the registry that names them.

``get_architecture(name)`` returns everything heterofl-edge knows about one
model family: how to build it at a width, its slicing spec, its input shape
and its task. ``name`` is a built-in (``conv``, ``resnet18``, ``transformer``),
an installed entry point of the group ``heterofl_edge.models``, or a reference
``package.module:factory`` (see ``heterofl_edge.models.registry``).
``build_model`` is the short form for the model alone.
"""

from __future__ import annotations

from enum import StrEnum

from torch import nn

from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.autospec import SpecInference, infer_spec
from heterofl_edge.models.conv import ConvNet
from heterofl_edge.models.interface import ModelInterface, TaskKind
from heterofl_edge.models.layers import Scaler, StaticBatchNorm2d
from heterofl_edge.models.registry import (
    ENTRY_POINT_GROUP,
    get_architecture,
    list_models,
    register_architecture,
    resolve_model,
)
from heterofl_edge.models.resnet import ResNet18
from heterofl_edge.models.transformer import MaskedLanguageTransformer

__all__ = [
    "ENTRY_POINT_GROUP",
    "Architecture",
    "ConvNet",
    "MaskedLanguageTransformer",
    "ModelInterface",
    "ModelName",
    "ResNet18",
    "Scaler",
    "SpecInference",
    "StaticBatchNorm2d",
    "TaskKind",
    "build_model",
    "get_architecture",
    "infer_spec",
    "list_models",
    "register_architecture",
    "resolve_model",
]


class ModelName(StrEnum):
    """The built-in models (any registered name or ``module:factory`` works too)."""

    conv = "conv"
    resnet18 = "resnet18"
    transformer = "transformer"


def build_model(name: str | ModelName, rate: float = 1.0, global_rate: float = 1.0) -> nn.Module:
    """Shorthand for ``get_architecture(name).build(rate, global_rate)``."""
    return get_architecture(name).build(rate, global_rate)
