"""Which pip extra brings which package, for the one-line error of a command that needs it.

``pip install heterofl-edge`` is what a device needs (numpy, onnxruntime,
safetensors, requests, typer). A command that needs more imports it inside
the command; a missing package arrives here as ``ModuleNotFoundError`` and
becomes ``MissingExtra`` naming the extra that brings it.
"""

from __future__ import annotations

from heterofl_edge.errors import MissingExtra

__all__ = ["EXTRA_OF_PACKAGE", "missing_extra"]

# Top-level import name -> the extra in pyproject.toml that installs it.
EXTRA_OF_PACKAGE = {
    "torch": "server",
    "onnx": "server",
    "onnxscript": "server",
    "flask": "server",
    "flask_openapi3": "server",
    "prometheus_client": "server",
    "waitress": "server",
    "cheroot": "server",
    "matplotlib": "server",
    "PIL": "images",
    "executorch": "executorch",
    "ray": "ray",
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> MissingExtra | None:
    """The extra that ``command`` lacks, or None when the missing module is no extra's."""
    package = (exc.name or "").split(".", 1)[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    return None if extra is None else MissingExtra(extra, f"'{command}'")
