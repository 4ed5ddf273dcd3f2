"""Reusable command-line options: ``--model`` and ``--data``, checked through the registries.

A command declares ``model: ModelOption = "conv"`` (or ``ModelArgument`` for a
positional ``MODEL``) and receives the name as a ``str`` that
``get_architecture`` accepts: a built-in, an installed entry point or
``package.module:factory``. An unknown name stops the command before it
starts, with the registry's ``ConfigError`` (a one-line error listing the
choices, exit code 2). ``DataOption`` does the same for data sets.

The registries load models and data sets with torch, so they are imported in
the callbacks, not here: every command module imports this one, and a device
install (no torch) still assembles the command line.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, TypeVar

import typer

from heterofl_edge.errors import ConfigError

__all__ = [
    "DataOption",
    "ModelArgument",
    "ModelDataOption",
    "ModelOption",
    "check_data_name",
    "check_model_name",
    "parse_choice",
]

E = TypeVar("E", bound=StrEnum)

MODEL_HELP = "Model: conv, resnet18, transformer, an installed one, or package.module:factory."
DATA_HELP = "Data set: mnist, wikitext2, imagefolder, an installed one, or package.module:loader."


def check_model_name(value: str) -> str:
    """Typer callback: the model's canonical name, or the registry's ``ConfigError``."""
    from heterofl_edge.models.registry import resolve_model

    return resolve_model(value)


def check_data_name(value: str) -> str:
    """Typer callback: the data set's name, or the registry's ``ConfigError``."""
    from heterofl_edge.data.registry import resolve_dataset

    return resolve_dataset(value).name


def parse_choice(enum: type[E], text: str, name: str) -> E:
    """``enum(text)``, or a ``ConfigError`` listing the values.

    For choices whose enum lives in a module that needs an extra: the option is
    a ``str`` and the command converts it once it has imported that module.
    """
    try:
        return enum(text.strip().lower())
    except ValueError:
        values = ", ".join(e.value for e in enum)
        raise ConfigError(f"unknown {name} {text!r}", f"use one of: {values}") from None


ModelOption = Annotated[
    str, typer.Option("--model", help=MODEL_HELP, callback=check_model_name, show_default=True)
]
ModelArgument = Annotated[
    str, typer.Argument(metavar="MODEL", help=MODEL_HELP, callback=check_model_name)
]
DataOption = Annotated[
    str, typer.Option("--data", help=DATA_HELP, callback=check_data_name, show_default=True)
]


def _check_optional_data_name(value: str | None) -> str | None:
    return None if value is None else check_data_name(value)


ModelDataOption = Annotated[
    str | None,
    typer.Option(
        "--data",
        help=DATA_HELP + " (default: the model's own: conv mnist, resnet18 imagefolder, "
        "transformer wikitext2)",
        callback=_check_optional_data_name,
    ),
]

# Left unset: the paper's for the model (``heterofl_edge.simulation.local_training``).
LocalEpochsOption = Annotated[
    int | None, typer.Option(help="Local epochs E per round (paper: 5; transformer 1).")
]
BatchSizeOption = Annotated[
    int | None, typer.Option(help="Local batch size B (paper: 10; transformer 100).")
]
