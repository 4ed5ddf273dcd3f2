"""Tensors on the wire: safetensors bytes with a string metadata header.

Never pickle: safetensors holds names, dtypes and shapes, and loading it runs
no code. Malformed or truncated bodies raise ``WireError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from heterofl_edge.errors import HeteroFLError

__all__ = ["WireError", "decode", "encode", "metadata_json"]


class WireError(HeteroFLError):
    """A body that is not a readable safetensors payload."""


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))


def decode(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors payload."""
    if len(payload) < 8:
        raise WireError("body is not a safetensors payload (too short)", _HINT)
    header_length = int.from_bytes(payload[:8], "little")
    if header_length > len(payload) - 8:
        raise WireError("body is truncated: the safetensors header runs past its end", _HINT)
    try:
        header = json.loads(payload[8 : 8 + header_length])
        tensors = load(payload)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"body is not a valid safetensors payload: {exc}", _HINT) from None
    metadata = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def metadata_json(metadata: Mapping[str, str], key: str, default: Any) -> Any:
    """A JSON value stored under ``key`` in the metadata header."""
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError:
        raise WireError(f"metadata field {key!r} is not valid JSON", _HINT) from None


_HINT = "send the tensors as safetensors bytes (safetensors.numpy.save), never pickle"
