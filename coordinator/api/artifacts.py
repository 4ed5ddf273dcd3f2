"""Artifacts by level and format: served once the coordinator has built them."""

from __future__ import annotations

from flask import Response, send_file
from flask_openapi3 import APIBlueprint

from coordinator.api import errors, service, tag
from coordinator.errors import ApiError, ErrorCode
from coordinator.schemas import ArtifactFilePath, ArtifactPath

bp = APIBlueprint("artifacts", __name__, abp_tags=[tag("artifacts", "On-device programs")])

_MANIFEST = {"description": "the level's manifest (JSON)", "content": {"application/json": {}}}
_FILE = {
    "description": "one program file",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


@bp.get(
    "/v1/artifacts/<model>/<level>/manifest.json",
    responses={200: _MANIFEST, **errors(400, 404, 503)},
)
def manifest(path: ArtifactPath) -> Response:
    """A level's manifest: programs, their inputs and outputs, files with sha256."""
    folder, _ = service().artifacts.locate(path.model, path.level)
    return send_file(folder / "manifest.json", mimetype="application/json", max_age=60)


@bp.get(
    "/v1/artifacts/<model>/<level>/<fmt>/<name>", responses={200: _FILE, **errors(400, 404, 503)}
)
def artifact(path: ArtifactFilePath) -> Response:
    """One file the manifest lists (checked against its sha256 by the device)."""
    folder, meta = service().artifacts.locate(path.model, path.level)
    relative = f"{path.fmt}/{path.name}"
    if relative not in meta["files"]:  # only files the manifest lists: no path tricks
        raise ApiError(ErrorCode.not_found, f"no artifact {relative} for level {path.level}")
    response = send_file(folder / relative, mimetype="application/octet-stream", max_age=3600)
    response.headers["X-Content-SHA256"] = meta["files"][relative]["sha256"]
    return response
