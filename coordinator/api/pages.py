"""Pages for people: the live coordinator page at ``/`` and its static files.

The page is read-only and reads the same ``/v1`` JSON a script would. Files
come from the package (``coordinator/static``), never from a CDN.
"""

from __future__ import annotations

from pathlib import Path

from flask import Response, send_from_directory
from flask_openapi3 import APIBlueprint
from pydantic import BaseModel

from coordinator.errors import ApiError, ErrorCode

bp = APIBlueprint("pages", __name__)

STATIC = Path(__file__).resolve().parents[1] / "static"
_FOLDERS = ("dashboard", "device")


@bp.get("/", doc_ui=False)
def dashboard() -> Response:
    """The live coordinator page."""
    return _send("dashboard", "index.html", max_age=0)


class StaticPath(BaseModel):
    folder: str
    name: str


@bp.get("/static/<folder>/<path:name>", doc_ui=False)
def static_file(path: StaticPath) -> Response:
    if path.folder not in _FOLDERS:
        raise ApiError(ErrorCode.not_found, f"no static folder {path.folder!r}")
    return _send(path.folder, path.name, max_age=300)


def _send(folder: str, name: str, max_age: int) -> Response:
    root = STATIC / folder
    if not (root / name).resolve().is_relative_to(root.resolve()) or not (root / name).is_file():
        raise ApiError(ErrorCode.not_found, f"no file {name!r}")
    return send_from_directory(root, name, max_age=max_age)
