"""HTTP API blueprints, one per resource, all under /v1 (typed with flask-openapi3)."""

from __future__ import annotations

from typing import Any

from flask import current_app, g, request
from flask_openapi3 import Tag

from coordinator.errors import ErrorCode
from coordinator.registry import Device
from coordinator.runtime import Coordinator
from coordinator.schemas import ErrorReply

BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
# The operator's views: open, or behind the operator token where the coordinator has one.
OPERATOR: list[dict[str, list[str]]] = [{}, {"operator": []}]


def service() -> Coordinator:
    coordinator: Coordinator = current_app.extensions["heterofl"]
    return coordinator


def device() -> Device:
    """The calling device (its request counts as a heartbeat); 401 otherwise."""
    caller = service().registry.authenticate(request.headers.get("Authorization"))
    caller.bytes_in += request.content_length or 0
    g.device_id = caller.id
    return caller


def operator() -> None:
    """401 ``operator_token_required`` unless the caller may read the operator's views."""
    service().admission.check_operator(request.headers.get("Authorization"))


def errors(*codes: int) -> dict[str | int, Any]:
    """Error replies an operation documents (every one is an ``ErrorReply``)."""
    return {code: ErrorReply for code in (*codes, 500)}


def tag(name: str, description: str) -> Tag:
    return Tag(name=name, description=description)


__all__ = ["BEARER", "OPERATOR", "ErrorCode", "device", "errors", "operator", "service", "tag"]
