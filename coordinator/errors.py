"""Errors the HTTP API turns into JSON replies: a status and a machine-readable code.

Every error reply is ``{"code": ..., "message": ..., "hint": ...}``. Clients
decide on ``code`` (a stable, documented name), never on the message text.
4xx codes name the client's mistake; 5xx codes name a fault on the server,
which is logged with its traceback and never blamed on the device.
"""

from __future__ import annotations

from enum import StrEnum

from heterofl_edge.errors import HeteroFLError

__all__ = ["STATUS", "ApiError", "ErrorCode"]


class ErrorCode(StrEnum):
    """Every code an error reply can carry, with its HTTP status in ``STATUS``."""

    invalid_request = "invalid_request"  # a path, query or JSON body that does not parse
    bad_profile = "bad_profile"  # a registration profile out of bounds
    bad_payload = "bad_payload"  # a body that is not a readable safetensors payload
    bad_metadata = "bad_metadata"  # safetensors metadata missing, malformed or out of bounds
    missing_token = "missing_token"
    unknown_token = "unknown_token"
    not_assigned = "not_assigned"  # the device has no such task in that round
    unknown_round = "unknown_round"
    not_found = "not_found"
    demo_shard_too_large = "demo_shard_too_large"  # a demo shard above the served cap
    method_not_allowed = "method_not_allowed"
    request_timeout = "request_timeout"  # the body stopped arriving
    round_closed = "round_closed"  # the round (or its phase) closed before this arrived
    duplicate_upload = "duplicate_upload"
    payload_too_large = "payload_too_large"
    wrong_tensors = "wrong_tensors"  # names do not match the level
    bad_dtype = "bad_dtype"
    bad_shape = "bad_shape"
    not_finite = "not_finite"
    bad_labels = "bad_labels"
    bad_statistics = "bad_statistics"
    not_ready = "not_ready"  # artifacts still being built (server side, retry later)
    storage_error = "storage_error"  # the disk or database failed (server side)
    internal_error = "internal_error"  # a bug (server side)


STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.bad_profile: 400,
    ErrorCode.bad_payload: 400,
    ErrorCode.bad_metadata: 400,
    ErrorCode.demo_shard_too_large: 400,
    ErrorCode.missing_token: 401,
    ErrorCode.unknown_token: 401,
    ErrorCode.not_assigned: 403,
    ErrorCode.unknown_round: 404,
    ErrorCode.not_found: 404,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.request_timeout: 408,
    ErrorCode.round_closed: 409,
    ErrorCode.duplicate_upload: 409,
    ErrorCode.payload_too_large: 413,
    ErrorCode.wrong_tensors: 422,
    ErrorCode.bad_dtype: 422,
    ErrorCode.bad_shape: 422,
    ErrorCode.not_finite: 422,
    ErrorCode.bad_labels: 422,
    ErrorCode.bad_statistics: 422,
    ErrorCode.internal_error: 500,
    ErrorCode.not_ready: 503,
    ErrorCode.storage_error: 503,
}


class ApiError(HeteroFLError):
    """An error reply; ``code`` decides the HTTP status.

    Only this error becomes a 4xx reply: any other exception met while
    answering a request, a ``HeteroFLError`` from the server's own work
    included, is a fault on the server (500, logged with its traceback).
    """

    def __init__(self, code: ErrorCode, message: str, hint: str = "") -> None:
        super().__init__(message, hint, code=code.value)
        self.error_code = code

    @property
    def status(self) -> int:
        return STATUS[self.error_code]
