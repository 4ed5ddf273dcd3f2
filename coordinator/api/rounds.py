from __future__ import annotations

from flask import Blueprint, jsonify, request

from coordinator.api.common import device, service, tensor_reply

bp = Blueprint("rounds", __name__)


@bp.get("/v1/rounds")
def history():  # type: ignore[no-untyped-def]
    return jsonify(rounds=service().history())


@bp.get("/v1/rounds/<int:number>/weights")
def weights(number: int):  # type: ignore[no-untyped-def]
    return tensor_reply(service().weights(device(), number))


@bp.post("/v1/rounds/<int:number>/update")
def update(number: int):  # type: ignore[no-untyped-def]
    caller = device()
    return jsonify(service().upload_update(caller, number, request.get_data(cache=False)))


@bp.post("/v1/rounds/<int:number>/statistics")
def statistics(number: int):  # type: ignore[no-untyped-def]
    caller = device()
    return jsonify(service().upload_statistics(caller, number, request.get_data(cache=False)))
