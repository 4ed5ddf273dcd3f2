"""The paper's settings per model (Table 6, checked against the official code).

SGD with momentum 0.9 and weight decay 5e-4, gradient norm clipped to 1,
learning rate x0.1 at each milestone. A run leaves unset what it takes from
here (``heterofl_edge.spec.FederationSpec`` resolves it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from heterofl_edge.data.registry import resolve_dataset
from heterofl_edge.errors import ConfigError
from heterofl_edge.models import get_architecture
from heterofl_edge.partition import Split
from heterofl_edge.task_kind import TaskKind
from heterofl_edge.training import LocalTrainingConfig

__all__ = ["PAPER_SETTINGS", "PaperSettings", "dataset_for", "local_training", "paper_settings"]


@dataclass(frozen=True)
class PaperSettings:
    """A model's settings in the paper; ``data``: the data set it trains on."""

    lr: float
    local: LocalTrainingConfig
    rounds: Mapping[Split, int]
    milestones: Mapping[Split, tuple[int, ...]]
    data: str | None


PAPER_SETTINGS: dict[str, PaperSettings] = {
    "conv": PaperSettings(
        0.01,
        LocalTrainingConfig(epochs=5, batch_size=10),
        {Split.iid: 200, Split.non_iid: 400},
        {Split.iid: (100,), Split.non_iid: (200,)},
        "mnist",
    ),
    "resnet18": PaperSettings(
        0.1,
        LocalTrainingConfig(epochs=5, batch_size=10),
        {Split.iid: 400, Split.non_iid: 800},
        {Split.iid: (150, 250), Split.non_iid: (300, 500)},
        "imagefolder",  # CIFAR-10 as images
    ),
    # The transformer is split IID only (as in the paper); its non-IID row is the paper's.
    "transformer": PaperSettings(
        0.1,
        LocalTrainingConfig(epochs=1, batch_size=100),
        {Split.iid: 100, Split.non_iid: 200},
        {Split.iid: (25, 50), Split.non_iid: (50, 100)},
        "wikitext2",
    ),
}


def paper_settings(model: str) -> PaperSettings:
    """``model``'s settings in the paper.

    A model of a user's gets those of the built-in of its task (transformer for a
    language model, else conv), and no default data set.
    """
    if model in PAPER_SETTINGS:
        return PAPER_SETTINGS[model]
    task = get_architecture(model).task
    return replace(
        PAPER_SETTINGS["transformer" if task is TaskKind.language_model else "conv"], data=None
    )


def dataset_for(model: str, data: str | None) -> str:
    """The data set ``model`` trains on: ``data``, else the paper's; checked against its task.

    ``ConfigError`` when the model has no default data set, or when the data set
    is registered for another task (checked by name: nothing is loaded).
    """
    arch = get_architecture(model)
    name = data if data is not None else paper_settings(model).data
    if name is None:
        raise ConfigError(
            f"model {model!r} has no default data set",
            "name one with --data (a registered data set or package.module:loader)",
        )
    entry = resolve_dataset(name)
    if entry.task is not None and entry.task is not arch.task:
        raise ConfigError(
            f"model {model!r} is a {arch.task.value} model, data set {entry.name!r} "
            f"is for {entry.task.value}",
            "pick a data set of the model's task (e.g. transformer with wikitext2)",
        )
    return name


def local_training(
    model: str, epochs: int | None = None, batch_size: int | None = None
) -> LocalTrainingConfig:
    """The paper's local training for ``model``, with ``epochs`` or ``batch_size`` if given."""
    local = paper_settings(model).local
    return replace(
        local,
        epochs=local.epochs if epochs is None else epochs,
        batch_size=local.batch_size if batch_size is None else batch_size,
    )
