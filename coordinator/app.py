"""Flask app factory: ``create_app(config)`` -> the coordinator's HTTP API.

The app is a ``flask_openapi3.OpenAPI`` (a Flask subclass): pydantic models
in ``coordinator.schemas`` validate each request's path and JSON body and
produce the OpenAPI document served at ``/v1/openapi.json``. Errors are JSON
``{"code", "message", "hint"}`` everywhere: ``ApiError`` is the client's
mistake (4xx) or a named server condition (503); any other exception is a
fault on the server, logged with its traceback and answered 500.
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid
from typing import Any

from flask import Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_openapi3 import Info, OpenAPI
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from coordinator.api import artifacts, devices, health, model, pages, rounds
from coordinator.config import CoordinatorConfig
from coordinator.errors import STATUS, ApiError, ErrorCode
from coordinator.logs import ACCESS
from coordinator.runtime import Clock, Coordinator
from coordinator.schemas import ErrorReply

__all__ = ["create_app"]

log = logging.getLogger("heterofl_edge.coordinator")

_HTTP_CODES = {
    400: ErrorCode.invalid_request,
    404: ErrorCode.not_found,
    405: ErrorCode.method_not_allowed,
    408: ErrorCode.request_timeout,
    413: ErrorCode.payload_too_large,
}
_UPLOADS = {"rounds.update": "update", "rounds.statistics": "statistics"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class StrictJSONProvider(DefaultJSONProvider):
    """Strict JSON both ways (RFC 8259 as interoperable parsers read it).

    Out: non-finite numbers become null. In: ``NaN``, ``Infinity`` and
    ``-Infinity`` (which Python's parser accepts) and duplicate keys (where
    parsers disagree on which value wins) are refused, as is deep nesting.
    """

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(_finite(obj), **kwargs)

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        kwargs.setdefault("object_pairs_hook", _unique_keys)
        kwargs.setdefault("parse_constant", _no_constant)
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"duplicate key {key[:64]!r}")
        found[key] = value
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error_reply(code: ErrorCode, message: str, hint: str = "", status: int | None = None) -> Any:
    response = jsonify(code=code.value, message=message, hint=hint)
    response.status_code = status or STATUS[code]
    return response


def _body_error() -> ErrorCode:
    """The code of a request body that does not parse or fit: a registration's is its profile."""
    if request.endpoint == "devices.register":
        return ErrorCode.bad_profile
    return ErrorCode.invalid_request


def _validation_error(error: ValidationError) -> Any:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:3]
    )
    return error_reply(
        _body_error(), f"request does not fit the API: {problems}", "see /v1/openapi.json"
    )


def create_app(config: CoordinatorConfig, clock: Clock = time.time, start: bool = True) -> OpenAPI:
    """The coordinator for ``config``; resumes whatever its state folder holds.

    ``start`` runs its worker thread (exports, rounds); tests may start it later.
    """
    coordinator = Coordinator.open(config, clock)
    app = OpenAPI(
        "heterofl_edge.coordinator",
        info=Info(
            title="heterofl-edge coordinator",
            version="1",
            description="HeteroFL rounds over a fleet of devices: register, poll for tasks, "
            "download weights, upload safetensors. Every error reply carries a `code`.",
        ),
        security_schemes={
            "bearer": {"type": "http", "scheme": "bearer", "description": "a device's token"},
            "operator": {
                "type": "http",
                "scheme": "bearer",
                "description": "the operator token, where the coordinator has one",
            },
        },
        doc_ui=False,
        validation_error_status=400,
        validation_error_model=ErrorReply,
        validation_error_callback=_validation_error,
    )
    app.json = StrictJSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = config.max_upload_bytes
    app.extensions["heterofl"] = coordinator
    for module in (health, devices, rounds, model, artifacts, pages):
        app.register_api(module.bp)

    @app.get("/v1/openapi.json", doc_ui=False)
    def openapi() -> Any:
        return jsonify(app.api_doc)

    @app.before_request
    def before() -> Any:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given[:64] if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        number = (request.view_args or {}).get("number")
        g.round = number if isinstance(number, int) and number < 2**31 else None
        length = request.content_length or 0
        if request.endpoint not in _UPLOADS and length > config.max_json_bytes:
            return error_reply(
                ErrorCode.payload_too_large,
                f"body too large: the limit is {config.max_json_bytes} bytes here",
            )
        if request.endpoint not in _UPLOADS and length and request.is_json:
            try:  # the schemas validate what this strict parse accepts
                app.json.loads(request.get_data(cache=True))
            except (ValueError, UnicodeDecodeError) as exc:
                return error_reply(
                    _body_error(),
                    f"the body is not strict JSON: {str(exc)[:200]}",
                    "send RFC 8259 JSON: finite numbers, each key once",
                )
        return None

    @app.after_request
    def after(response: Response) -> Response:
        metrics = coordinator.metrics
        endpoint = request.endpoint or "unknown"
        started = g.get("started")
        if started is not None:
            metrics.request_seconds.labels(endpoint, request.method).observe(
                time.perf_counter() - started
            )
        metrics.bytes.labels("in").inc(request.content_length or 0)
        if not response.is_streamed:
            metrics.bytes.labels("out").inc(response.content_length or 0)
        kind = _UPLOADS.get(endpoint)
        if kind is not None and response.status_code >= 400:
            code = (response.get_json(silent=True) or {}).get("code", "unknown")
            metrics.uploads.labels(kind, code).inc()
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if ACCESS.isEnabledFor(logging.INFO):
            ACCESS.info(
                "%s %s %d",
                request.method,
                request.path,
                response.status_code,
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "seconds": round(time.perf_counter() - (started or 0.0), 6),
                },
            )
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Any:
        if error.status >= 500:
            log.error("%s: %s", error.code, error.message)
        response = error_reply(error.error_code, error.message, error.hint)
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Any:
        status = error.code or 500
        code = _HTTP_CODES.get(status, ErrorCode.invalid_request)
        if status == 413:
            message = f"body too large: the limit is {config.max_upload_bytes} bytes"
            return error_reply(code, message)
        if status >= 500:
            return error_reply(ErrorCode.internal_error, error.description or error.name)
        reply = error_reply(code, error.description or error.name, status=status)
        for name, value in error.get_headers():  # e.g. a 405's Allow
            if name.lower() != "content-type":
                reply.headers[name] = value
        return reply

    @app.errorhandler(Exception)
    def internal_error(error: Exception) -> Any:
        log.exception("internal error answering %s %s", request.method, request.path)
        return error_reply(
            ErrorCode.internal_error,
            "internal error in the coordinator",
            "a fault on the server, not your request: retry; the coordinator logged it",
        )

    if start:
        coordinator.start()
    return app
