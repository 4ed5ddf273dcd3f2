from __future__ import annotations

from typing import Any

from flask import jsonify
from flask_openapi3 import APIBlueprint

from coordinator.api import BEARER, device, errors, service, tag
from coordinator.schemas import DeviceList, DeviceProfileIn, Heartbeat, Registered, TaskReply

bp = APIBlueprint("devices", __name__, abp_tags=[tag("devices", "Registration and tasks")])


@bp.post("/v1/devices", responses={201: Registered, **errors(400, 413, 503)})
def register(body: DeviceProfileIn) -> Any:
    """Register a device with its measured profile; the reply holds its token."""
    return jsonify(service().register(body.model_dump())), 201


@bp.get("/v1/task", security=BEARER, responses={200: TaskReply, **errors(401)})
def task() -> Any:
    """What the calling device should do now: train, statistics, wait or done."""
    return jsonify(service().board.task_for(device()))


@bp.post("/v1/heartbeat", security=BEARER, responses={200: Heartbeat, **errors(401)})
def heartbeat() -> Any:
    """Tell the coordinator the device is still working on its task."""
    caller = device()
    return jsonify(device_id=caller.id, state=service().device_state(caller.id).value)


@bp.get("/v1/devices", responses={200: DeviceList, **errors()})
def devices() -> Any:
    """Every registered device: state, level, profile, last seen, bytes (no tokens)."""
    return jsonify(service().device_views())
