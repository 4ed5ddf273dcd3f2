from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import APIBlueprint

from coordinator.api import BEARER, OPERATOR, device, errors, operator, service, tag
from coordinator.demo_data import DemoData, ShardQuery
from coordinator.errors import ApiError, ErrorCode
from coordinator.schemas import (
    SAFETENSORS,
    DemoDataInfo,
    DemoDataQuery,
    DeviceList,
    DeviceProfile,
    DevicesQuery,
    Heartbeat,
    Registered,
    TaskMessage,
    safetensors_response,
)

bp = APIBlueprint("devices", __name__, abp_tags=[tag("devices", "Registration and tasks")])


@bp.post("/v1/devices", responses={201: Registered, **errors(400, 401, 413, 429, 503)})
def register(body: DeviceProfile) -> Any:
    """Register a device with its measured profile; the reply holds its token."""
    coordinator = service()
    coordinator.admission.admit_registration(request.remote_addr or "", body.enrollment_token)
    registered = coordinator.register(body.model_dump(mode="json", exclude={"enrollment_token"}))
    return jsonify(registered.model_dump()), 201


@bp.get("/v1/task", security=BEARER, responses={200: TaskMessage, **errors(401)})
def task() -> Any:
    """What the calling device should do now: train, statistics, wait or done."""
    return jsonify(service().board.task_for(device()).model_dump(mode="json"))


@bp.post("/v1/heartbeat", security=BEARER, responses={200: Heartbeat, **errors(401)})
def heartbeat() -> Any:
    """Tell the coordinator the device is still working on its task."""
    caller = device()
    state = service().views.device_state(caller.id).value
    return jsonify(Heartbeat(device_id=caller.id, state=state).model_dump())


@bp.get("/v1/devices", security=OPERATOR, responses={200: DeviceList, **errors(400, 401)})
def devices(query: DevicesQuery) -> Any:
    """Devices by position, a page at a time: state, levels, profile, bytes (no tokens)."""
    operator()
    return jsonify(service().views.device_views(query.offset, query.limit))


def _demo() -> DemoData:
    demo = service().demo_data
    if demo is None:
        raise ApiError(
            ErrorCode.not_found,
            "this coordinator serves no demo data",
            "use your own data, or start the coordinator with --demo-data DIR",
        )
    return demo


def _shard(query: DemoDataQuery) -> ShardQuery:
    return ShardQuery(query.shard, query.clients, query.split, query.seed, query.train_examples)


@bp.get(
    "/v1/demo-data",
    responses={
        200: safetensors_response(
            "x uint8 [N, C, H, W] raw pixels with metadata 'normalise' (or float32 model "
            "inputs without it), y int64 [N]; metadata 'source' and 'shard'"
        ),
        **errors(400, 404),
    },
)
def demo_data(query: DemoDataQuery) -> Response:
    """A demo shard of the run's data set for a browser device (only with ``--demo-data``)."""
    return Response(_demo().shard(_shard(query)), mimetype=SAFETENSORS)


@bp.get("/v1/demo-data/info", responses={200: DemoDataInfo, **errors(400, 404)})
def demo_data_info(query: DemoDataQuery) -> Any:
    """The size and shape of the demo shard the same query downloads."""
    return jsonify(_demo().info(_shard(query)))
