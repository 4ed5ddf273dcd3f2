"""Device runtimes by name: one table from a name to the class that runs a level's programs.

``onnx`` (numpy + onnxruntime) is built in. Others come from installed
packages as entry points in the group ``heterofl_edge.runtimes``, loaded only
when a device asks for them; heterofl-edge itself declares ``executorch``
(``exporter.executorch_runtime``, which needs torch and ExecuTorch)::

    [project.entry-points."heterofl_edge.runtimes"]
    executorch = "exporter.executorch_runtime:ExecuTorchLevel [executorch]"

The ``[extra]`` after an entry point names the pip extra it needs: a runtime
whose imports fail raises ``MissingExtra`` naming it. A runtime is a callable
``factory(folder) -> LevelRuntime`` (see ``heterofl_edge.device_runtime``),
usually the runtime's class.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata

from device_sim.onnx_backend import OnnxLevel
from heterofl_edge.device_runtime import RuntimeFactory
from heterofl_edge.errors import ConfigError, MissingExtra

__all__ = ["ENTRY_POINT_GROUP", "get_runtime", "list_runtimes"]

ENTRY_POINT_GROUP = "heterofl_edge.runtimes"
_BUILT_IN: dict[str, RuntimeFactory] = {"onnx": OnnxLevel}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {p.name: p for p in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def list_runtimes() -> list[str]:
    """Names ``get_runtime`` accepts: the built-in, then installed entry points."""
    return list(_BUILT_IN) + sorted(n for n in _entry_points() if n not in _BUILT_IN)


@cache
def get_runtime(name: str) -> RuntimeFactory:
    """The runtime called ``name``; ``ConfigError`` listing the choices if there is none.

    An entry point is imported here, on first use; ``MissingExtra`` if its
    dependencies are not installed.
    """
    key = name.strip().lower()
    if key in _BUILT_IN:
        return _BUILT_IN[key]
    point = _entry_points().get(key)
    if point is None:
        raise ConfigError(
            f"unknown runtime {name!r}", f"choose one of: {', '.join(list_runtimes())}"
        )
    try:
        found = point.load()
    except ModuleNotFoundError:
        if not point.extras:
            raise
        raise MissingExtra(point.extras[0], f"the {key!r} runtime") from None
    if not callable(found):
        raise ConfigError(f"runtime {key!r} = {point.value!r} is not callable")
    factory: RuntimeFactory = found
    return factory
