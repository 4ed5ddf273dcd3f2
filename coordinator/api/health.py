from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.api import errors, operator, service, tag
from coordinator.schemas import Health

bp = APIBlueprint("health", __name__, abp_tags=[tag("health", "Status of the coordinator")])


@bp.get("/v1/health", responses={200: Health, **errors()})
def health() -> Any:
    """Round, devices, artifacts, and the last server fault if any."""
    return jsonify(service().views.health())


@bp.get("/metrics", doc_ui=False)
def metrics() -> Response:
    """Prometheus metrics (text exposition format)."""
    operator()
    return Response(generate_latest(service().metrics.registry), mimetype=CONTENT_TYPE_LATEST)
