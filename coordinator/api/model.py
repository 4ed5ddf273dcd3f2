from __future__ import annotations

from flask import Blueprint

from coordinator.api.common import service, tensor_reply

bp = Blueprint("model", __name__)


@bp.get("/v1/model")
def global_model():  # type: ignore[no-untyped-def]
    return tensor_reply(service().global_model())
