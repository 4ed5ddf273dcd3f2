"""heterofl-edge: HeteroFL (Diao, Ding & Tarokh, ICLR 2021) on real devices.

The core is pure HeteroFL math on tensors and plain data, with no I/O:

* ``levels``: the levels a..e and width rates;
* ``models``: width-scalable models (conv, resnet18, transformer) with the
  Scaler and static BatchNorm, and a slicing spec for each;
* ``slicing``: sub-model extraction from the global state;
* ``aggregation``: streaming HeteroFL aggregation;
* ``bn_stats``: static-BN statistics gathered from clients;
* ``loss``, ``partition``, ``assignment``, ``strategy``, ``training``;
* ``simulation``: the whole federation in one process.
"""

from heterofl_edge.aggregation import HeteroFLAggregator, validate_update
from heterofl_edge.assignment import Assignment, LevelMix, parse_mode
from heterofl_edge.errors import ConfigError, DataError, HeteroFLError, InternalError, UpdateError
from heterofl_edge.levels import Level, parse_rate, scaled_width
from heterofl_edge.models import build_model, get_architecture
from heterofl_edge.slicing import Dim, TensorRule, extract_submodel_state, shapes_at
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule

__all__ = [
    "Assignment",
    "ConfigError",
    "DataError",
    "Dim",
    "HeteroFLAggregator",
    "HeteroFLError",
    "HeteroFLStrategy",
    "InternalError",
    "Level",
    "LevelMix",
    "MultiStepSchedule",
    "TensorRule",
    "UpdateError",
    "build_model",
    "extract_submodel_state",
    "get_architecture",
    "parse_mode",
    "parse_rate",
    "scaled_width",
    "shapes_at",
    "validate_update",
]
__version__ = "0.1.0"
