"""The model registry: one table from a name to an ``Architecture``.

Three ways in, one lookup (``get_architecture``) for every command:

* **built-ins** (``conv``, ``resnet18``, ``transformer``) register themselves
  with ``register_architecture`` when ``heterofl_edge.models`` is imported;
* **installed packages** declare an entry point in the group
  ``heterofl_edge.models``, e.g. in their ``pyproject.toml``::

      [project.entry-points."heterofl_edge.models"]
      tiny-mlp = "tiny_mlp.model:build"

* **a reference** ``package.module:factory`` names a factory directly (the
  current directory is searched too, as web servers do for ``module:app``).

An entry point or reference names either a factory ``factory(rate: float,
**options) -> nn.Module`` whose module carries a ``ModelInterface`` (its
slicing spec is inferred, see ``heterofl_edge.models.autospec``), or a
ready ``Architecture`` with a hand-written spec. The toolkit calls
``factory(rate)``, so options keep their defaults (register one entry point
per variant, e.g. with ``functools.partial``); if the factory takes a
``scaler_rate`` keyword it gets ``rate / global_rate``, otherwise every
``heterofl_edge.models.Scaler`` in the built module is set to that rate.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Callable
from functools import cache, partial
from importlib import metadata
from typing import Any

import torch
from torch import nn

from heterofl_edge.errors import ConfigError, InternalError, ModelError
from heterofl_edge.models.architecture import Architecture
from heterofl_edge.models.autospec import infer_spec
from heterofl_edge.models.interface import INTERFACE_ATTRIBUTE, ModelInterface
from heterofl_edge.models.layers import Scaler

__all__ = [
    "ENTRY_POINT_GROUP",
    "ModelFactory",
    "architecture_from_factory",
    "get_architecture",
    "list_models",
    "model_listing",
    "register_architecture",
    "resolve_model",
]

ENTRY_POINT_GROUP = "heterofl_edge.models"
ModelFactory = Callable[..., nn.Module]
_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_BUILT_IN: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> None:
    """Add a built-in architecture to the table (done once, at import)."""
    if arch.name in _BUILT_IN:
        raise InternalError(f"model {arch.name!r} is registered twice")
    _BUILT_IN[arch.name] = arch


def _entry_points() -> dict[str, list[metadata.EntryPoint]]:
    found: dict[str, list[metadata.EntryPoint]] = {}
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(point.name, []).append(point)
    return found


def list_models() -> list[str]:
    """Names ``get_architecture`` accepts: the built-ins, then installed entry points."""
    return list(_BUILT_IN) + sorted(n for n in _entry_points() if n not in _BUILT_IN)


def model_listing() -> list[tuple[str, str, str]]:
    """(name, source, description) per model, without loading any entry point."""
    points = _entry_points()
    rows = [(n, "built-in", f"{a.task.value}: {a.description}") for n, a in _BUILT_IN.items()]
    for name in list_models()[len(_BUILT_IN) :]:
        point = points[name][0]
        dist = point.dist.name if point.dist is not None else "unknown package"
        rows.append((name, f"entry point ({dist})", point.value))
    return rows


def _choices() -> str:
    return ", ".join(list_models()) + ", or package.module:factory"


def resolve_model(name: str) -> str:
    """The canonical name of a model, checked cheaply; ``ConfigError`` listing choices if unknown.

    A reference is imported (``package.module:factory``), an entry point is not
    loaded: ``get_architecture`` does that.
    """
    key = str(getattr(name, "value", name)).strip()
    if key in _BUILT_IN or key in _entry_points():
        return key
    if ":" in key:
        _load_reference(key)
        return key
    raise ConfigError(f"unknown model {key!r}", f"choose one of: {_choices()}")


def _load_reference(reference: str) -> Any:
    if not _REFERENCE.match(reference):
        raise ConfigError(
            f"model reference {reference!r} is not of the form package.module:factory",
            "name a callable factory(rate) -> nn.Module, e.g. my_models.mlp:build",
        )
    module_name = reference.split(":", 1)[0]
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    point = metadata.EntryPoint(name=reference, value=reference, group=ENTRY_POINT_GROUP)
    try:
        return point.load()
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import {exc.name or module_name!r} for model {reference!r}",
            "install the package or run from the folder that holds it (or set PYTHONPATH)",
        ) from None
    except AttributeError:
        raise ConfigError(
            f"module {module_name!r} has no {reference.split(':', 1)[1]!r}",
            "check the name after the colon",
        ) from None


def _load_entry_point(name: str) -> tuple[Any, str]:
    points = _entry_points()[name]
    if len({p.value for p in points}) > 1:
        raise ConfigError(
            f"model {name!r} is declared by several installed packages: "
            + ", ".join(f"{p.value}" for p in points),
            "uninstall one of them or use package.module:factory",
        )
    point = points[0]
    distribution = point.dist.name if point.dist is not None else "unknown package"
    try:
        return point.load(), f"entry point ({distribution})"
    except Exception as exc:
        raise ConfigError(
            f"the entry point {name!r} = {point.value!r} of {distribution} does not load: "
            f"{type(exc).__name__}: {exc}",
            "reinstall that package or fix its entry point",
        ) from None


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name`` (a built-in, an entry point or ``module:factory``).

    ``ConfigError`` for an unknown name, listing the choices; ``ModelError`` for
    a model the toolkit cannot slice. Each name is looked up once per process.
    """
    return _lookup(resolve_model(name))


@cache
def _lookup(key: str) -> Architecture:
    if key in _BUILT_IN:
        return _BUILT_IN[key]
    if ":" in key:
        found, source = _load_reference(key), "module:factory"
    else:
        found, source = _load_entry_point(key)
    if isinstance(found, Architecture):
        return found
    if not callable(found):
        raise ConfigError(
            f"model {key!r} names a {type(found).__name__}, not a factory",
            "point it at a callable factory(rate: float, **options) -> nn.Module",
        )
    return architecture_from_factory(key, found, source)


def _takes_scaler_rate(factory: ModelFactory) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "scaler_rate" in parameters


def build_with_factory(
    factory: ModelFactory, name: str, rate: float, scaler_rate: float
) -> nn.Module:
    """``factory(rate)`` with its Scalers dividing by ``scaler_rate``."""
    if _takes_scaler_rate(factory):
        model = factory(rate, scaler_rate=scaler_rate)
    else:
        model = factory(rate)
        if isinstance(model, nn.Module):
            for module in model.modules():
                if isinstance(module, Scaler):
                    module.rate = scaler_rate
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{name}'s factory returned {type(model).__name__}, not a torch.nn.Module",
            "the factory is factory(rate: float, **options) -> nn.Module",
        )
    return model


def read_interface(model: nn.Module, name: str) -> ModelInterface:
    """The ``ModelInterface`` a user's model carries, checked."""
    interface = getattr(model, INTERFACE_ATTRIBUTE, None)
    if not isinstance(interface, ModelInterface):
        raise ModelError(
            f"{name}: the module has no {INTERFACE_ATTRIBUTE!r} (a ModelInterface)",
            f"set self.{INTERFACE_ATTRIBUTE} = heterofl_edge.models.ModelInterface("
            "input_shape=..., num_classes=...) in the model's __init__",
        )
    shape = interface.input_shape
    if not (isinstance(shape, tuple) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ModelError(f"{name}: input_shape {shape!r} is not a tuple of positive sizes")
    if not (isinstance(interface.num_classes, int) and interface.num_classes >= 1):
        raise ModelError(f"{name}: num_classes {interface.num_classes!r} is not a positive int")
    if not isinstance(interface.input_dtype, torch.dtype):
        raise ModelError(f"{name}: input_dtype {interface.input_dtype!r} is not a torch dtype")
    return interface


def architecture_from_factory(name: str, factory: ModelFactory, source: str) -> Architecture:
    """An ``Architecture`` for a user's factory: its interface read, its spec inferred."""
    build = partial(build_with_factory, factory, name)
    found: list[ModelInterface] = []

    def interface_of(model: nn.Module) -> ModelInterface:
        found.append(read_interface(model, name))
        return found[0]

    inference = infer_spec(lambda rate: build(rate, rate), interface_of, name)
    interface = found[0]
    doc = (inspect.getdoc(factory) or "").strip().splitlines()
    return Architecture(
        name=name,
        description=interface.description or (doc[0] if doc else name),
        factory=build,
        spec=inference.spec,
        input_shape=interface.input_shape,
        input_dtype=interface.input_dtype,
        num_classes=interface.num_classes,
        task=interface.task,
        source=source,
        inference=inference,
    )
