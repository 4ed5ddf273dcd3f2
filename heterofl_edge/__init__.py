"""heterofl-edge: HeteroFL (Diao, Ding & Tarokh, ICLR 2021) on real devices.

The core is pure HeteroFL math on tensors and plain data, with no I/O:

* ``levels``: the levels a..e and width rates;
* ``models``: width-scalable models (conv, resnet18, transformer) with the
  Scaler and static BatchNorm, a slicing spec for each, and the registry
  that also names users' models (slicing specs inferred from shapes);
* ``data``: data sets by name (MNIST, WikiText-2, image folders, users' loaders);
* ``tasks``: training and scoring for classification and the masked language model;
* ``slicing``: sub-model extraction from the global state;
* ``aggregation``: streaming HeteroFL aggregation;
* ``bn_stats``: static-BN statistics gathered from clients;
* ``loss``, ``partition``, ``assignment``, ``strategy``, ``training``;
* ``device_runtime``: what a device runtime promises (numpy in and out, no torch);
* ``simulation``: the whole federation on one machine (``sessions``,
  ``backends``: client sessions in process or in worker processes;
  ``ray_backend``: as Ray tasks) with ``journal`` checkpoints to resume from.
"""

from importlib import import_module
from typing import Any

# Public names and the module each lives in. They load on first use, so that a
# torch-free part (the device runtime reads MNIST with heterofl_edge.data.idx)
# does not import torch by importing this package.
_EXPORTS = {
    "Assignment": "assignment",
    "ConfigError": "errors",
    "DataError": "errors",
    "Dim": "slicing",
    "HeteroFLAggregator": "aggregation",
    "HeteroFLError": "errors",
    "HeteroFLStrategy": "strategy",
    "InternalError": "errors",
    "Level": "levels",
    "LevelMix": "assignment",
    "ModelError": "errors",
    "ModelInterface": "models",
    "MultiStepSchedule": "strategy",
    "TaskKind": "task_kind",
    "TensorRule": "slicing",
    "UpdateError": "errors",
    "build_model": "models",
    "check_compatible": "tasks",
    "extract_submodel_state": "slicing",
    "get_architecture": "models",
    "get_dataset": "data",
    "list_datasets": "data",
    "list_models": "models",
    "parse_mode": "assignment",
    "parse_rate": "levels",
    "scaled_width": "levels",
    "shapes_at": "slicing",
    "task_for": "tasks",
    "validate_update": "aggregation",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"heterofl_edge.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'heterofl_edge' has no attribute {name!r}")
