from __future__ import annotations

import hashlib

from flask import Response
from flask_openapi3 import APIBlueprint

from coordinator.api import errors, service, tag
from coordinator.registry import Device
from coordinator.schemas import SAFETENSORS, safetensors_response

bp = APIBlueprint("model", __name__, abp_tags=[tag("model", "The global model")])


def tensor_reply(payload: bytes, caller: Device | None = None) -> Response:
    response = Response(payload, mimetype=SAFETENSORS)
    response.headers["X-Content-SHA256"] = hashlib.sha256(payload).hexdigest()
    if caller is not None:
        caller.bytes_out += len(payload)
    return response


@bp.get("/v1/model", responses={200: safetensors_response("the global model"), **errors()})
def global_model() -> Response:
    """The global model after the last completed round (sBN statistics included)."""
    return tensor_reply(service().model_bytes())
