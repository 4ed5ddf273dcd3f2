"""Errors the HTTP API turns into JSON replies: a status and a machine-readable code.

Every error reply is ``{"code": ..., "message": ..., "hint": ...}``. Clients
decide on ``code`` (a stable, documented name), never on the message text.
4xx codes name the client's mistake; 5xx codes name a fault on the server,
which is logged with its traceback and never blamed on the device.
"""

from __future__ import annotations

from heterofl_edge.errors import HeteroFLError
from heterofl_edge.protocol import ErrorCode

__all__ = ["STATUS", "ApiError", "ErrorCode"]


# The HTTP status of every code (heterofl_edge.protocol.ErrorCode, shared with devices).
STATUS: dict[ErrorCode, int] = {
    ErrorCode.invalid_request: 400,
    ErrorCode.bad_profile: 400,
    ErrorCode.insufficient_memory: 400,
    ErrorCode.unsupported_runtime: 400,
    ErrorCode.bad_payload: 400,
    ErrorCode.bad_metadata: 400,
    ErrorCode.demo_shard_too_large: 400,
    ErrorCode.missing_token: 401,
    ErrorCode.unknown_token: 401,
    ErrorCode.enrollment_required: 401,
    ErrorCode.bad_enrollment_token: 401,
    ErrorCode.operator_token_required: 401,
    ErrorCode.too_many_registrations: 429,
    ErrorCode.not_assigned: 403,
    ErrorCode.unknown_round: 404,
    ErrorCode.not_found: 404,
    ErrorCode.method_not_allowed: 405,
    ErrorCode.request_timeout: 408,
    ErrorCode.round_closed: 409,
    ErrorCode.stale_update: 409,
    ErrorCode.duplicate_upload: 409,
    ErrorCode.payload_too_large: 413,
    ErrorCode.wrong_tensors: 422,
    ErrorCode.bad_dtype: 422,
    ErrorCode.bad_shape: 422,
    ErrorCode.not_finite: 422,
    ErrorCode.bad_labels: 422,
    ErrorCode.bad_statistics: 422,
    ErrorCode.secure_aggregation_unsupported: 400,
    ErrorCode.bad_key: 422,
    ErrorCode.unknown_peer: 422,
    ErrorCode.bad_share: 422,
    ErrorCode.wrong_length: 422,
    ErrorCode.bad_modulus: 422,
    ErrorCode.replayed_key: 409,
    ErrorCode.duplicate_advertisement: 409,
    ErrorCode.duplicate_unmask: 409,
    ErrorCode.wrong_encoding: 422,
    ErrorCode.bad_scales: 422,
    ErrorCode.internal_error: 500,
    ErrorCode.not_ready: 503,
    ErrorCode.storage_error: 503,
    ErrorCode.too_many_connections: 503,
}


class ApiError(HeteroFLError):
    """An error reply; ``code`` decides the HTTP status.

    Only this error becomes a 4xx reply: any other exception met while
    answering a request, a ``HeteroFLError`` from the server's own work
    included, is a fault on the server (500, logged with its traceback).
    """

    def __init__(
        self, code: ErrorCode, message: str, hint: str = "", retry_after: int | None = None
    ) -> None:
        super().__init__(message, hint, code=code.value)
        self.error_code = code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)

    @property
    def status(self) -> int:
        return STATUS[self.error_code]
