"""Errors the HTTP API turns into JSON replies, each with its status code."""

from __future__ import annotations

from heterofl_edge.errors import HeteroFLError

__all__ = ["ApiError", "Conflict", "Forbidden", "NotFound", "Unauthorized"]


class ApiError(HeteroFLError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409
