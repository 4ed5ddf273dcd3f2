from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import APIBlueprint

from coordinator.api import BEARER, OPERATOR, device, errors, operator, service, tag
from coordinator.api.model import tensor_reply
from coordinator.schemas import (
    Accepted,
    RoundList,
    RoundPath,
    SafetensorsBody,
    SecAggAnswer,
    safetensors_response,
)

bp = APIBlueprint("rounds", __name__, abp_tags=[tag("rounds", "Rounds, weights and uploads")])


@bp.get("/v1/rounds", security=OPERATOR, responses={200: RoundList, **errors(401)})
def history() -> Any:
    """Every round: state, selected devices, uploads, result."""
    operator()
    return jsonify(rounds=service().views.history())


@bp.get(
    "/v1/rounds/<int:number>/weights",
    security=BEARER,
    responses={
        200: safetensors_response("the sub-model of the device's task"),
        **errors(400, 401, 403, 404, 409),
    },
)
def weights(path: RoundPath) -> Response:
    """The weights of the calling device's task in this round, in its download_encoding."""
    caller = device()
    return tensor_reply(service().board.weights_for(caller, path.number), caller)


@bp.post(
    "/v1/rounds/<int:number>/update",
    security=BEARER,
    responses={200: Accepted, **errors(400, 401, 403, 404, 408, 409, 413, 422, 503)},
)
def update(path: RoundPath, raw: SafetensorsBody) -> Any:
    """Upload a trained sub-model, or its update, in the task's upload_encoding.

    safetensors; metadata (JSON strings) num_samples, labels, metrics, and for a lossy
    encoding ``encoding`` (fp16, bf16, int8: the update, trained minus received weights)
    and for int8 ``scales``: {tensor: base64 of one little-endian float32 per output
    channel}.
    """
    caller = device()
    body = request.get_data(cache=False)
    return jsonify(service().board.accept_update(caller, path.number, body).model_dump())


@bp.post(
    "/v1/rounds/<int:number>/statistics",
    security=BEARER,
    responses={200: Accepted, **errors(400, 401, 403, 404, 408, 409, 413, 422, 503)},
)
def statistics(path: RoundPath, raw: SafetensorsBody) -> Any:
    """Upload sBN statistics: LAYER.count, LAYER.mean, LAYER.var for every sBN layer."""
    caller = device()
    body = request.get_data(cache=False)
    return jsonify(service().board.accept_statistics(caller, path.number, body).model_dump())


@bp.post(
    "/v1/rounds/<int:number>/secagg",
    security=BEARER,
    responses={200: Accepted, **errors(400, 401, 403, 404, 409, 422)},
)
def secagg(path: RoundPath, body: SecAggAnswer) -> Any:
    """Answer a secure aggregation stage: public keys, encrypted shares or unmasking shares."""
    caller = device()
    return jsonify(service().board.accept_secagg(caller, path.number, body).model_dump())
