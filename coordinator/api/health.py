from __future__ import annotations

from flask import Blueprint, jsonify

from coordinator.api.common import service
from coordinator.openapi import openapi_document

bp = Blueprint("health", __name__)


@bp.get("/v1/health")
def health():  # type: ignore[no-untyped-def]
    coordinator = service()
    coordinator.tick()
    current = coordinator.current_round()
    return jsonify(
        status="ok",
        model=coordinator.arch.name,
        mode=coordinator.mix.name,
        round=None if current is None else current.number,
        round_state=None if current is None else current.state,
        completed_rounds=coordinator.completed_rounds(),
        rounds=coordinator.config.rounds,
        done=coordinator.completed_rounds() >= coordinator.config.rounds,
        devices=len(coordinator.store.devices()),
    )


@bp.get("/v1/openapi.json")
def openapi():  # type: ignore[no-untyped-def]
    return jsonify(openapi_document())
