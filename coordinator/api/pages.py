"""Pages for people: the live coordinator page at ``/`` and the device page at ``/device/``.

The live page is read-only and reads the same ``/v1`` JSON a script would.
The device page turns a browser (a phone) into a device: its ES modules and
onnxruntime-web's wasm runtime are copied into ``coordinator/static/device``
by ``make web`` and listed with their types and sha256 in ``assets.json``.
Files come from the package, never from a CDN; the device page and its
assets are sent cross-origin isolated (COOP/COEP), which wasm threads need.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from flask import Response, redirect, request, send_from_directory
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


@bp.get("/favicon.ico", doc_ui=False)
def favicon() -> Response:
    """The pages' icon (nested squares: the levels' upper-left sub-models)."""
    response = _send("dashboard", "favicon.ico", max_age=86400)
    response.headers["Cross-Origin-Resource-Policy"] = "same-origin"  # the device page's COEP
    return response


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
    if not _is_file_inside(root, name):
        raise ApiError(ErrorCode.not_found, f"no file {name!r}")
    return send_from_directory(root, name, max_age=max_age)


def _is_file_inside(root: Path, name: str) -> bool:
    """Whether ``name`` is a file under ``root``; False for any name the filesystem refuses.

    A NUL byte, an unencodable character or an over-long name is no file here, not a fault.
    """
    try:
        path = root / name
        return path.resolve().is_relative_to(root.resolve()) and path.is_file()
    except (OSError, ValueError):
        return False


_ISOLATED = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@functools.cache
def _device_assets() -> dict[str, Any]:
    path = STATIC / "device" / "assets.json"
    if not path.is_file():
        return {}
    files: dict[str, Any] = json.loads(path.read_text())["files"]
    return files


@bp.get("/device", doc_ui=False)
def device_redirect() -> Response:
    query = request.query_string.decode("latin-1")
    return redirect("/device/" + (f"?{query}" if query else ""), code=308)  # type: ignore[return-value]


@bp.get("/device/", doc_ui=False)
def device_page() -> Response:
    """The browser device client."""
    return _device_file("device.html")


class DevicePath(BaseModel):
    name: str


@bp.get("/device/<path:name>", doc_ui=False)
def device_asset(path: DevicePath) -> Response:
    return _device_file(path.name)


def _device_file(name: str) -> Response:
    assets = _device_assets()
    if not assets:
        raise ApiError(
            ErrorCode.not_found,
            "the device page is not installed",
            "run 'make web' (npm packages, then the page copied into the package)",
        )
    entry = assets.get(name)
    if entry is None:  # only listed names reach the filesystem
        raise ApiError(ErrorCode.not_found, f"no device page file {name!r}")
    folder = STATIC / "device"
    gzipped = folder / f"{name}.gz"
    use_gzip = gzipped.is_file() and "gzip" in request.headers.get("Accept-Encoding", "")
    response = send_from_directory(
        folder,
        f"{name}.gz" if use_gzip else name,
        mimetype=entry["content_type"],
        max_age=0 if name.endswith(".html") else 3600,
        etag=entry["sha256"],
        conditional=True,
    )
    if use_gzip:
        response.headers["Content-Encoding"] = "gzip"
    if gzipped.is_file():
        response.vary.add("Accept-Encoding")
    response.headers.update(_ISOLATED)
    return response
