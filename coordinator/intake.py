"""Everything a device sends, parsed into bounded, typed, finite values, or refused.

This is the one place where device input enters the coordinator's state. A
payload that passes here can be stored, folded into the aggregate and served
back as strict JSON without any later step failing on it:

* tensors: safetensors only (never pickle), the exact names, shapes and dtype
  of the device's level in its task's encoding (float32; or float16, bfloat16,
  int8 with one finite positive scale per output channel: an update), every
  value finite, and for an update every weight it stands for finite as well;
* metadata: JSON strings with bounded length, integers within bounds,
  metrics as a small map of finite numbers;
* sBN statistics: one integer ``count`` per layer equal to the examples the
  device was asked to summarise, finite means, non-negative finite variances.

Every refusal is an ``ApiError`` with a 4xx status and a code.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load

from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.aggregation import check_layout, not_finite_error
from heterofl_edge.bn_stats import ChannelMoments
from heterofl_edge.encoding import (
    Encoding,
    EncodingError,
    apply_update,
    declared_encoding,
    decode_tensors,
)
from heterofl_edge.errors import UpdateError
from heterofl_edge.secagg import MODULUS_BITS, SecAggRefusal, check_masked, wire_dtype
from heterofl_edge.slicing import SlicingSpec, trainable_names

__all__ = [
    "LIMITS",
    "Limits",
    "ParsedUpdate",
    "UpdateFacts",
    "check_update",
    "decode_payload",
    "decode_update",
    "parse_masked",
    "parse_statistics",
    "parse_update",
]

_PAYLOAD_HINT = "send the tensors as safetensors bytes (safetensors.numpy.save), never pickle"
_METADATA_HINT = (
    'metadata values are JSON strings: {"num_samples": "600", "labels": "[0, 1]", '
    '"metrics": "{\\"loss\\": 0.5}"}'
)
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# safetensors' dtype codes, named as numpy and torch name them (for messages).
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    header_bytes: int = 1 << 20  # the safetensors JSON header
    tensors: int = 4096
    metadata_value_chars: int = 16_384
    metadata_keys: int = 16
    metrics: int = 32
    metric_magnitude: float = 1e12
    samples: int = 10**9
    statistic_magnitude: float = 1e15  # merged in float64, cast to float32 stays finite


LIMITS = Limits()


@dataclass(frozen=True)
class UpdateFacts:
    """What an upload says besides its tensors."""

    num_samples: int | None  # None: a private run's (not released)
    labels: tuple[int, ...] | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class ParsedUpdate(UpdateFacts):
    tensors: dict[str, torch.Tensor]  # as sent: the weights (fp32), else the update
    encoding: Encoding = Encoding.fp32


def _read_header(body: bytes, limits: Limits) -> tuple[int, dict[str, str]]:
    """The length of a safetensors body's JSON header and its string metadata, checked."""
    if len(body) < 8:
        raise ApiError(ErrorCode.bad_payload, "body is not a safetensors payload", _PAYLOAD_HINT)
    header_length = int.from_bytes(body[:8], "little")
    if header_length > min(len(body) - 8, limits.header_bytes):
        raise ApiError(
            ErrorCode.bad_payload,
            "body is truncated or its safetensors header is too large",
            _PAYLOAD_HINT,
        )
    try:
        header = json.loads(body[8 : 8 + header_length], parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(
            ErrorCode.bad_payload, "the safetensors header is not JSON", _PAYLOAD_HINT
        ) from None
    if not isinstance(header, dict) or len(header) > limits.tensors + 1:
        raise ApiError(ErrorCode.bad_payload, "the safetensors header is malformed", _PAYLOAD_HINT)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ApiError(ErrorCode.bad_metadata, "metadata must map strings to strings")
    if len(metadata) > limits.metadata_keys:
        raise ApiError(
            ErrorCode.bad_metadata, f"metadata has more than {limits.metadata_keys} keys"
        )
    return header_length, metadata


def _invalid(exc: Exception) -> ApiError:
    return ApiError(
        ErrorCode.bad_payload, f"body is not a valid safetensors payload: {exc}", _PAYLOAD_HINT
    )


def decode_payload(
    body: bytes, limits: Limits = LIMITS
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors body; ``bad_payload`` otherwise."""
    _, metadata = _read_header(body, limits)
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise _invalid(exc) from None
    return tensors, metadata


def check_update(
    body: bytes,
    spec: SlicingSpec,
    rate: float,
    num_classes: int,
    limits: Limits = LIMITS,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    private: bool = False,
    encoding: Encoding | None = None,
    received: Mapping[str, np.ndarray] | None = None,
) -> UpdateFacts:
    """``parse_update``'s checks, without building tensors: for the request path.

    ``encoding`` is the task's upload encoding (None: whatever the payload
    declares); ``received``, the weights the device was sent, makes an update's
    weights checked finite too. safetensors (Rust) checks the layout, names,
    dtypes and shapes are read from it, and float32 values are checked finite in
    one pass over the body's data. (safetensors still copies each tensor's bytes
    out; a 28 kB upload is checked in a third of the time.)
    """
    header_length, metadata = _read_header(body, limits)
    entries = _entries(body)
    declared = _declared(metadata, encoding)
    try:
        _check_layout(entries, spec, rate, shapes, declared)
        if declared is Encoding.fp32:
            data = np.frombuffer(body, dtype="<f4", offset=8 + header_length)  # safetensors: LE
            if not np.isfinite(data).all():
                culprit = next(
                    name
                    for name, info in entries
                    if not np.isfinite(np.frombuffer(info["data"], dtype="<f4")).all()
                )
                raise not_finite_error(culprit)
        else:
            update = decode_tensors(entries, declared, metadata, trainable_names(spec))
            if received is not None:
                _check_weights(apply_update(received, update))
    except (UpdateError, EncodingError) as exc:
        raise ApiError(ErrorCode(exc.code), exc.message, exc.hint) from None
    return _update_facts(metadata, num_classes, limits, private)


def parse_update(
    body: bytes,
    spec: SlicingSpec,
    rate: float,
    num_classes: int,
    limits: Limits = LIMITS,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    encoding: Encoding | None = None,
) -> ParsedUpdate:
    """A trained sub-model of width ``rate`` (or its update) with its metadata, all checked.

    ``encoding`` as for ``check_update``; the tensors are decoded to float32.
    """
    _, metadata = _read_header(body, limits)
    entries = _entries(body)
    declared = _declared(metadata, encoding)
    try:
        _check_layout(entries, spec, rate, shapes, declared)
        arrays = decode_tensors(entries, declared, metadata, trainable_names(spec))
    except (UpdateError, EncodingError) as exc:
        raise ApiError(ErrorCode(exc.code), exc.message, exc.hint) from None
    facts = _update_facts(metadata, num_classes, limits)
    tensors = {name: torch.from_numpy(np.array(a, np.float32)) for name, a in arrays.items()}
    return ParsedUpdate(facts.num_samples, facts.labels, facts.metrics, tensors, declared)


def decode_update(
    body: bytes, encoding: Encoding, received: Mapping[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """The float32 weights a stored upload (checked by ``check_update``) stands for.

    fp32: the weights themselves; a lossy encoding: ``received`` plus the update.
    """
    _, metadata = _read_header(body, LIMITS)
    decoded = decode_tensors(_entries(body), encoding, metadata)
    if not encoding.lossy:
        return decoded
    if received is None:
        raise ApiError(ErrorCode.internal_error, "an update arrived without its round's weights")
    return apply_update(received, decoded)


def _entries(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    try:
        return list(safetensors.deserialize(body))
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise _invalid(exc) from None


def _declared(metadata: Mapping[str, str], expected: Encoding | None) -> Encoding:
    """The payload's encoding; ``wrong_encoding`` if it is not the task's."""
    try:
        declared = declared_encoding(metadata)
    except EncodingError as exc:
        raise ApiError(ErrorCode(exc.code), exc.message, exc.hint) from None
    if expected is not None and declared is not expected:
        raise ApiError(
            ErrorCode.wrong_encoding,
            f"the upload is {declared.value}, the task asks for {expected.value}",
            "encode the upload as the task's upload_encoding says (metadata 'encoding')",
        )
    return declared


def _check_layout(
    entries: list[tuple[str, dict[str, Any]]],
    spec: SlicingSpec,
    rate: float,
    shapes: Mapping[str, tuple[int, ...]] | None,
    encoding: Encoding,
) -> None:
    """Names and shapes of the level's tensors, each in ``encoding``'s dtype (``UpdateError``)."""
    wanted = _DTYPE_NAMES[encoding.dtype]
    layout = {
        name: (_DTYPE_NAMES.get(info["dtype"], str(info["dtype"])), tuple(info["shape"]))
        for name, info in entries
    }
    # check_layout knows float32 only: the encoding's dtype stands in for it.
    as_float32 = {
        n: ("float32" if d == wanted else f"not {wanted}", shape)
        for n, (d, shape) in layout.items()
    }
    try:
        check_layout(as_float32, spec, rate, shapes)
    except UpdateError as exc:
        if exc.code != "bad_dtype":
            raise
        culprit = next(n for n in trainable_names(spec) if layout[n][0] != wanted)
        raise UpdateError(
            f"{culprit} has dtype {layout[culprit][0]}, expected {wanted}"
            + ("" if encoding is Encoding.fp32 else f" (encoding {encoding.value})"),
            code="bad_dtype",
        ) from None


def _check_weights(weights: Mapping[str, np.ndarray]) -> None:
    for name, values in weights.items():
        if not np.isfinite(values).all():
            raise UpdateError(
                f"{name} plus the weights it was sent is not finite",
                "check the client's training",
                code="not_finite",
            )


def _update_facts(
    metadata: Mapping[str, str], num_classes: int, limits: Limits, private: bool = False
) -> UpdateFacts:
    """What an upload says besides its tensors; a private run's keeps none of it.

    In a private run a device releases only its update: its example count, labels
    and metrics, if it sent them anyway, are dropped here, never stored.
    """
    if private:
        return UpdateFacts(None, None, {})
    num_samples = _bounded_int(
        _metadata_json(metadata, "num_samples", None, limits), "num_samples", 1, limits.samples
    )
    labels = _labels(_metadata_json(metadata, "labels", None, limits), num_classes)
    metrics = _metrics(_metadata_json(metadata, "metrics", {}, limits), limits)
    return UpdateFacts(num_samples, labels, metrics)


def parse_statistics(
    body: bytes, widths: Mapping[str, int], expected_count: int, limits: Limits = LIMITS
) -> dict[str, ChannelMoments]:
    """Per-layer sBN moments: LAYER.count / .mean / .var for every layer in ``widths``.

    ``count`` must equal ``expected_count``, the examples the device trained on
    in this round (every layer sees the same examples).
    """
    tensors, _ = decode_payload(body, limits)
    expected = {f"{layer}.{part}" for layer in widths for part in ("count", "mean", "var")}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise ApiError(
            ErrorCode.wrong_tensors,
            f"statistics must hold count, mean and var for every sBN layer "
            f"(missing {missing}, unexpected {extra})",
            "run the statistics program of the task's level over all of your examples",
        )
    moments = {}
    for layer, width in widths.items():
        count_tensor = tensors[f"{layer}.count"]
        if count_tensor.numel() != 1 or not count_tensor.is_floating_point():
            raise ApiError(ErrorCode.bad_statistics, f"{layer}.count must be one float number")
        count = float(count_tensor.double().reshape(()))
        if count != expected_count:
            raise ApiError(
                ErrorCode.bad_statistics,
                f"{layer}.count is {count:g}, expected {expected_count}",
                "count the examples you trained on this round (the task's expected_count)",
            )
        parts = {}
        for part in ("mean", "var"):
            tensor = tensors[f"{layer}.{part}"]
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != (width,):
                raise ApiError(
                    ErrorCode.bad_shape, f"{layer}.{part} must be float32 of shape ({width},)"
                )
            if not torch.isfinite(tensor).all():
                raise ApiError(ErrorCode.not_finite, f"{layer}.{part} holds NaN or Inf values")
            if tensor.abs().max() > limits.statistic_magnitude:
                raise ApiError(
                    ErrorCode.bad_statistics,
                    f"{layer}.{part} has values above {limits.statistic_magnitude:g}",
                )
            parts[part] = tensor
        if (parts["var"] < 0).any():
            raise ApiError(ErrorCode.bad_statistics, f"{layer}.var has negative entries")
        moments[layer] = ChannelMoments(int(count), parts["mean"], parts["var"])
    return moments


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number in strict JSON")


def _metadata_json(metadata: Mapping[str, str], key: str, default: Any, limits: Limits) -> Any:
    if key not in metadata:
        return default
    text = metadata[key]
    if len(text) > limits.metadata_value_chars:
        raise ApiError(
            ErrorCode.bad_metadata,
            f"metadata {key!r} is longer than {limits.metadata_value_chars} characters",
        )
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ApiError(
            ErrorCode.bad_metadata, f"metadata {key!r} is not strict JSON", _METADATA_HINT
        ) from None


def _bounded_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(
            ErrorCode.bad_metadata,
            f"metadata {name!r} must be an integer in {low}..{high}",
            _METADATA_HINT,
        )
    return value


def _labels(value: Any, num_classes: int) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or len(value) > num_classes
        or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < num_classes for x in value
        )
        or len(set(value)) != len(value)
    ):
        raise ApiError(
            ErrorCode.bad_labels,
            f"metadata 'labels' must list distinct integers in 0..{num_classes - 1}",
            "list the labels present in your training data",
        )
    return tuple(sorted(value))


def _metrics(value: Any, limits: Limits) -> dict[str, float]:
    if not isinstance(value, dict) or len(value) > limits.metrics:
        raise ApiError(
            ErrorCode.bad_metadata,
            f"metadata 'metrics' must be a JSON object of at most {limits.metrics} numbers",
        )
    metrics = {}
    for name, number in value.items():
        if not _METRIC_NAME.match(name):
            raise ApiError(ErrorCode.bad_metadata, f"metric name {name[:64]!r} is not allowed")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ApiError(ErrorCode.bad_metadata, f"metric {name!r} must be a number")
        try:
            as_float = float(number)
        except OverflowError:
            as_float = math.inf
        if not (math.isfinite(as_float) and abs(as_float) <= limits.metric_magnitude):
            raise ApiError(
                ErrorCode.bad_metadata,
                f"metric {name!r} must be a finite number within ±{limits.metric_magnitude:g}",
            )
        metrics[name] = as_float
    return metrics


def parse_masked(
    body: bytes, length: int, modulus_bits: int = MODULUS_BITS, limits: Limits = LIMITS
) -> np.ndarray:
    """A secure upload's masked vector: one tensor ``masked`` of ``length`` elements.

    Its elements lie in Z_{2^modulus_bits}: uint16 up to 16 bits, else uint32.
    ``bad_payload`` for a body that is not safetensors, ``wrong_tensors`` for
    other tensor names, ``bad_modulus`` for another dtype or an element of the
    modulus or more, ``wrong_length`` for another length: nothing of such an
    upload is kept.
    """
    header_length, _ = _read_header(body, limits)
    # One tensor: read in place from the header's offsets (a level-a vector is 6 MB, and
    # every upload is read twice: here and when the engine folds it), checked as strictly as
    # safetensors checks: the offsets cover the data exactly.
    header = json.loads(body[8 : 8 + header_length])
    names = sorted(n for n in header if n != "__metadata__")
    if names != ["masked"]:
        raise ApiError(
            ErrorCode.wrong_tensors,
            f"a secure upload holds one tensor 'masked', not {names[:5]}",
            "upload the masked vector only",
        )
    entry = header["masked"]
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(type(x) is int and x >= 0 for x in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(type(x) is int for x in entry["data_offsets"])
    ):
        raise ApiError(
            ErrorCode.bad_payload, "the masked tensor's header entry is malformed", _PAYLOAD_HINT
        )
    dtype = np.dtype(wire_dtype(modulus_bits))
    if entry["dtype"].lower() not in (f"u{8 * dtype.itemsize}", dtype.name):
        raise ApiError(
            ErrorCode.bad_modulus,
            f"a masked vector holds {dtype.name} elements (modulus 2^{modulus_bits}), "
            f"not {entry['dtype']}",
            f"mask in Z_2^{modulus_bits}, as the task's secure.modulus_bits says",
        )
    if list(entry["shape"]) != [length]:
        raise ApiError(
            ErrorCode.wrong_length,
            f"the masked vector has shape {list(entry['shape'])}, the task's layout [{length}]",
            "lay the vector out as the task's plan says",
        )
    nbytes = length * dtype.itemsize
    if entry["data_offsets"] != [0, nbytes] or 8 + header_length + nbytes != len(body):
        raise ApiError(
            ErrorCode.bad_payload,
            "the masked tensor's data offsets do not cover the body's data exactly",
            _PAYLOAD_HINT,
        )
    little = dtype.newbyteorder("<")
    vector = np.frombuffer(body, little, count=length, offset=8 + header_length)
    vector = vector.astype(dtype, copy=False)  # no copy where the machine is little-endian
    try:
        check_masked(vector, length, modulus_bits)
    except SecAggRefusal as refusal:
        raise ApiError(ErrorCode.bad_modulus, refusal.message) from None
    return vector
