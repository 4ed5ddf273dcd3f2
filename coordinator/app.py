"""Flask app factory: ``create_app(config)`` -> the coordinator's HTTP API."""

from __future__ import annotations

import logging
import time

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from coordinator.api import artifacts, devices, health, model, rounds
from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError
from coordinator.service import Clock, Coordinator
from coordinator.wire import WireError
from heterofl_edge.errors import ConfigError, HeteroFLError, UpdateError

__all__ = ["create_app"]

log = logging.getLogger("heterofl_edge.coordinator")


def _status(error: HeteroFLError) -> int:
    if isinstance(error, ApiError):
        return error.status
    if isinstance(error, UpdateError):
        return 422
    if isinstance(error, WireError | ConfigError):
        return 400
    return 400


def create_app(config: CoordinatorConfig, clock: Clock = time.time) -> Flask:
    """The coordinator for ``config``; resumes whatever its state folder holds."""
    app = Flask("heterofl_edge.coordinator")
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.extensions["heterofl"] = Coordinator(config, clock)
    for module in (health, devices, rounds, model, artifacts):
        app.register_blueprint(module.bp)

    @app.errorhandler(HeteroFLError)
    def library_error(error: HeteroFLError):  # type: ignore[no-untyped-def]
        body = {"error": error.message}
        if error.hint:
            body["hint"] = error.hint
        return jsonify(body), _status(error)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge):  # type: ignore[no-untyped-def]
        limit = config.max_upload_bytes
        return jsonify(error=f"body too large: the limit is {limit} bytes"), 413

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):  # type: ignore[no-untyped-def]
        return jsonify(error=error.description or error.name), error.code or 500

    @app.errorhandler(Exception)
    def internal_error(error: Exception):  # type: ignore[no-untyped-def]
        log.exception("internal error")
        return jsonify(error="internal error in the coordinator; see its log"), 500

    return app
