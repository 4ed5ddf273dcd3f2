from __future__ import annotations

from flask import Blueprint, jsonify, request

from coordinator.api.common import device, service
from coordinator.errors import ApiError

bp = Blueprint("devices", __name__)


@bp.post("/v1/devices")
def register():  # type: ignore[no-untyped-def]
    profile = request.get_json(silent=True)
    if profile is None:
        raise ApiError("body must be a JSON device profile", "send Content-Type: application/json")
    return jsonify(service().register(profile)), 201


@bp.get("/v1/task")
def task():  # type: ignore[no-untyped-def]
    return jsonify(service().task(device()))
