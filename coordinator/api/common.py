"""What every blueprint shares: the service, authentication, tensor replies."""

from __future__ import annotations

import hashlib

from flask import Response, current_app, request

from coordinator.service import Coordinator
from coordinator.store import Device

SAFETENSORS = "application/vnd.safetensors"


def service() -> Coordinator:
    coordinator: Coordinator = current_app.extensions["heterofl"]
    return coordinator


def device() -> Device:
    return service().authenticate(request.headers.get("Authorization"))


def tensor_reply(payload: bytes) -> Response:
    response = Response(payload, mimetype=SAFETENSORS)
    response.headers["X-Content-SHA256"] = hashlib.sha256(payload).hexdigest()
    return response
