"""The OpenAPI 3.1 description of the coordinator's /v1 API, served at /v1/openapi.json."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_document"]

_ERROR = {
    "description": "JSON error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_TENSORS = {"application/vnd.safetensors": {"schema": {"type": "string", "format": "binary"}}}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def openapi_document() -> dict[str, Any]:
    errors = {code: _ERROR for code in ("400", "401", "403", "404", "409", "413", "422")}
    return {
        "openapi": "3.1.0",
        "info": {"title": "heterofl-edge coordinator", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "hint": {"type": "string"}},
                },
                "Profile": {
                    "type": "object",
                    "required": ["step_ms", "reference_rate", "memory_mb", "bandwidth_mbps"],
                    "properties": {
                        "step_ms": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "description": "median training-step time of the reference artifact",
                        },
                        "reference_rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "memory_mb": {"type": "number", "exclusiveMinimum": 0},
                        "bandwidth_mbps": {"type": "number", "exclusiveMinimum": 0},
                        "runtimes": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Task": {
                    "type": "object",
                    "required": ["action"],
                    "properties": {
                        "action": {"enum": ["train", "statistics", "wait", "done"]},
                        "round": {"type": "integer"},
                        "level": {"type": "string"},
                        "rate": {"type": "number"},
                        "lr": {"type": "number"},
                        "hyperparameters": {"type": "object"},
                        "artifact": {"type": "object"},
                        "weights_url": {"type": "string"},
                        "upload_url": {"type": "string"},
                        "deadline": {"type": "number"},
                        "retry_after": {"type": "number"},
                    },
                },
            },
        },
        "paths": {
            "/v1/health": {
                "get": {
                    "summary": "Liveness and the current round",
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "responses": {"200": {"description": "ok"}}}
            },
            "/v1/devices": {
                "post": {
                    "summary": "Register a device with its profile; returns id, token, level",
                    "requestBody": {
                        "required": True,
                        "content": _json({"$ref": "#/components/schemas/Profile"}),
                    },
                    "responses": {"201": {"description": "registered"}, **errors},
                }
            },
            "/v1/task": {
                "get": {
                    "summary": "The device's current task",
                    "security": _AUTH,
                    "responses": {
                        "200": {
                            "description": "task",
                            "content": _json({"$ref": "#/components/schemas/Task"}),
                        },
                        **errors,
                    },
                }
            },
            "/v1/artifacts/{model}/{level}/manifest.json": {
                "get": {
                    "summary": "A level's artifact manifest (exported on first request)",
                    "responses": {"200": {"description": "manifest"}, **errors},
                }
            },
            "/v1/artifacts/{model}/{level}/{format}/{file}": {
                "get": {
                    "summary": "One artifact file; its sha256 is in the X-Content-SHA256 header",
                    "responses": {"200": {"description": "file"}, **errors},
                }
            },
            "/v1/rounds": {
                "get": {
                    "summary": "Round history and metrics",
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/v1/rounds/{round}/weights": {
                "get": {
                    "summary": "Weights for the device's task in this round (its level's slice)",
                    "security": _AUTH,
                    "responses": {"200": {"description": "weights", "content": _TENSORS}, **errors},
                }
            },
            "/v1/rounds/{round}/update": {
                "post": {
                    "summary": "Upload the trained sub-model",
                    "description": "metadata (JSON strings): num_samples, labels, metrics",
                    "security": _AUTH,
                    "requestBody": {"required": True, "content": _TENSORS},
                    "responses": {"200": {"description": "accepted"}, **errors},
                }
            },
            "/v1/rounds/{round}/statistics": {
                "post": {
                    "summary": "Upload sBN statistics: LAYER.count, .mean, .var per layer",
                    "security": _AUTH,
                    "requestBody": {"required": True, "content": _TENSORS},
                    "responses": {"200": {"description": "accepted"}, **errors},
                }
            },
            "/v1/model": {
                "get": {
                    "summary": "The global model",
                    "responses": {"200": {"description": "weights", "content": _TENSORS}},
                }
            },
        },
    }
