"""Compressed transport: how weights go down to devices and updates come back up.

Four encodings, for both directions (``Encoding``):

* ``fp32``: float32, as before. A **download** is the level's weights; an fp32
  **upload** is the trained weights, unchanged (bit for bit what the device
  trained, and what a device that knows no encodings sends).
* ``fp16``: IEEE half precision, round to nearest even (numpy's conversion).
* ``bf16``: bfloat16, the upper 16 bits of the float32 rounded to nearest even.
* ``int8``: one float32 scale per output channel (row 0 of a tensor with two or
  more dimensions; a single scale for a vector or scalar), ``scale =
  float32(max|row| / 127)`` (1 for an all-zero row), and **unbiased stochastic
  rounding**: ``q = clip(floor(x / scale + u), -127, 127)``, computed in float64,
  with ``u`` uniform in [0, 1) from SplitMix64 (``heterofl_edge.batching``,
  ``uniforms``: ``(next64 >> 11) * 2**-53``) seeded with the payload's rounding
  seed, one draw per element, tensors in sorted name order, each in row-major
  order, one continuing generator. Decoding is ``float32(q * scale)``.

A lossy **upload** is the *update*, ``trained - received`` in float32 (the
weights the device decoded from its download), which quantizes far better than
the weights; the coordinator (and the simulation) adds it back to the same
received weights (``apply_update``), so the aggregate stays HeteroFL's average
of weights, element by element over the clients holding each. With error
feedback (``UpdateEncoder``), what quantization dropped is carried into the
device's next lossy upload at the same level.

The container stays safetensors: tensors as ``F32``, ``F16``, ``BF16`` or
``I8``; the metadata (JSON strings, like every upload's) says ``encoding`` and,
for int8, ``scales``: ``{tensor name: base64 of its scales as little-endian
float32}``. The browser's ``web/encoding.js`` implements the same rules and
agrees bit for bit on ``tests/vectors/encoding.json``.

With the other features:

* **Differential privacy** (``heterofl_edge.privacy``): in the server
  placement the aggregator clips what the coordinator decodes (the received
  weights plus the decoded update), so quantization error is inside the clipped,
  noised contribution; in the distributed placement a device adds its noise
  share to its clipped update and then encodes it.
* **Secure aggregation** (``heterofl_edge.secagg``, ``SharedInt8``): with
  ``int8`` uploads the integers are what is masked. Every device of a round
  then uses one step, ``clip / 127`` (the secure run's clip, public), instead of
  its own ``max|row| / 127``, so that the integers of all the devices holding an
  element add up; their sums need ``8 + ceil(log2 n)`` bits for n devices, and
  an upload of at most 16 bits travels as uint16. fp16 and bf16 do not compose
  (not integers); every level of a secure run uploads fp32 or int8 alike.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from safetensors import SafetensorError, TensorSpec, deserialize, serialize

from heterofl_edge.batching import SplitMix64
from heterofl_edge.errors import ConfigError, HeteroFLError
from heterofl_edge.levels import parse_rate, rate_label

__all__ = [
    "Decoded",
    "Encoding",
    "EncodingError",
    "EncodingPlan",
    "LevelEncodings",
    "TransferLog",
    "UpdateEncoder",
    "apply_update",
    "declared_encoding",
    "decode_payload",
    "decode_tensors",
    "download_seed",
    "encode_payload",
    "encode_tensors",
    "make_update",
    "parse_encoding",
    "parse_scales",
    "payload_metadata",
    "rows_of",
    "training_bytes_per_device",
    "upload_seed",
]

Arrays = dict[str, np.ndarray]

INT8_LIMIT = 127  # q in [-127, 127]: symmetric, so -x encodes as -q
_CHUNK = 1 << 20  # elements per block of uniforms (bounded memory for large tensors)


class EncodingError(HeteroFLError):
    """A payload that does not decode under its encoding; ``code`` is the protocol's.

    Codes: ``wrong_encoding``, ``bad_dtype``, ``bad_scales``, ``not_finite``,
    ``bad_metadata``, ``bad_payload``.
    """

    code = "bad_payload"


class Encoding(StrEnum):
    """How a payload's values travel (the module docstring)."""

    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"

    @property
    def dtype(self) -> str:
        """The safetensors dtype code of its tensors."""
        return {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "I8"}[self.value]

    @property
    def lossy(self) -> bool:
        """Whether it loses bits (an upload in it is an update, not weights)."""
        return self is not Encoding.fp32


def parse_encoding(value: str) -> Encoding:
    """``Encoding`` named by ``value``; ``ConfigError`` listing the choices otherwise."""
    try:
        return Encoding(value.strip().lower())
    except ValueError:
        raise ConfigError(
            f"unknown encoding {value!r}", f"use one of: {', '.join(e.value for e in Encoding)}"
        ) from None


# -- which encoding where ------------------------------------------------------------------


@dataclass(frozen=True)
class LevelEncodings:
    """An encoding for every level: a default and per-level overrides.

    Written ``DEFAULT[,LEVEL=ENCODING...]``, as a flag and as a TOML string alike:
    ``fp16`` (every level), ``fp32,d=int8,e=int8`` (int8 only at levels d and e).
    A level is a letter a..e or a rate as the mode writes it (``0.3``).
    """

    default: Encoding = Encoding.fp32
    levels: tuple[tuple[str, Encoding], ...] = ()

    @classmethod
    def parse(cls, text: str) -> LevelEncodings:
        """The encodings ``text`` names; ``ConfigError`` for a malformed one."""
        parts = [p.strip() for p in str(text).split(",")]
        if not parts or not parts[0] or "=" in parts[0]:
            raise ConfigError(
                f"encoding {text!r} must start with the default encoding",
                "e.g. fp16, or fp32,d=int8,e=int8 (int8 at levels d and e only)",
            )
        default = parse_encoding(parts[0])
        levels: dict[str, Encoding] = {}
        for part in parts[1:]:
            label, sep, name = part.partition("=")
            if not sep or not label.strip():
                raise ConfigError(
                    f"{part!r} in encoding {text!r} is not LEVEL=ENCODING", "e.g. d=int8"
                )
            label = rate_label(parse_rate(label.strip()))
            if label in levels:
                raise ConfigError(f"level {label} is given twice in encoding {text!r}")
            levels[label] = parse_encoding(name)
        return cls(default, tuple(sorted(levels.items())))

    def for_rate(self, rate: float) -> Encoding:
        """The encoding of the level of width ``rate``."""
        return dict(self.levels).get(rate_label(rate), self.default)

    def check_levels(self, rates: Iterable[float], what: str) -> None:
        """``ConfigError`` if an override names a level that is not in play."""
        in_play = {rate_label(r) for r in rates}
        unknown = [label for label, _ in self.levels if label not in in_play]
        if unknown:
            raise ConfigError(
                f"{what} names levels {unknown} that are not in the mode",
                f"the levels in play are {', '.join(sorted(in_play))}",
            )

    def __str__(self) -> str:
        return ",".join([self.default.value, *(f"{k}={v.value}" for k, v in self.levels)])


@dataclass(frozen=True)
class EncodingPlan:
    """A run's transport: the encodings down and up per level, and error feedback."""

    download: LevelEncodings = field(default_factory=LevelEncodings)
    upload: LevelEncodings = field(default_factory=LevelEncodings)
    error_feedback: bool = False

    def choose(
        self, rate: float, declared: Iterable[str] | None
    ) -> tuple[Encoding, Encoding, str | None]:
        """(download, upload, note) for a device of level ``rate`` that ``declared`` these.

        A device never gets an encoding it did not declare (None: it declared none, so
        fp32 only): the run's encoding falls back to fp32, and ``note`` says so.
        """
        able = {Encoding.fp32} | {Encoding(e) for e in (declared or ()) if e in _NAMES}
        wanted = {"download": self.download.for_rate(rate), "upload": self.upload.for_rate(rate)}
        missing = [f"{what} {e.value}" for what, e in wanted.items() if e not in able]
        note = None
        if missing:
            note = (
                f"the run uses {' and '.join(missing)} at level {rate_label(rate)}; this "
                "device did not declare it, so fp32 is used instead"
            )
        down, up = (e if e in able else Encoding.fp32 for e in wanted.values())
        return down, up, note


_NAMES = frozenset(e.value for e in Encoding)


def upload_seed(batch_seed: int) -> int:
    """The stochastic-rounding seed of an upload, from the task's batch seed: in [0, 2**32)."""
    return int(np.random.SeedSequence([int(batch_seed), 0x5EED_0808]).generate_state(1)[0])


def download_seed(run_seed: int, round_number: int, rate: float, phase: str = "training") -> int:
    """The rounding seed of a round's download at ``rate`` (all its devices get the same bytes)."""
    bits = int(np.float64(rate).view(np.uint64))
    words = [int(run_seed), int(round_number), bits >> 32, bits & 0xFFFFFFFF]
    words.append(0 if phase == "training" else 1)
    return int(np.random.SeedSequence([*words, 0xD0A1]).generate_state(1)[0])


# -- the numbers ------------------------------------------------------------------------------


def rows_of(shape: tuple[int, ...] | list[int]) -> int:
    """How many int8 scales a tensor of ``shape`` has: its first dimension, else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _int8(x: np.ndarray, rng: SplitMix64) -> tuple[np.ndarray, np.ndarray]:
    """(q, scales) of one float32 tensor, drawing its uniforms from ``rng``."""
    rows = rows_of(x.shape)
    flat = x.reshape(rows, x.size // rows if rows else 0)
    peak = np.abs(flat).max(axis=1) if flat.shape[1] else np.zeros(rows, np.float32)
    scales = (peak.astype(np.float64) / INT8_LIMIT).astype(np.float32)
    scales[~(scales > 0)] = np.float32(1.0)  # an all-zero row (or one too small to scale)
    values = flat.astype(np.float64).reshape(-1)
    per_row = np.repeat(scales.astype(np.float64), flat.shape[1])
    q = np.empty(values.shape, np.int8)
    for start in range(0, values.size, _CHUNK):
        stop = min(start + _CHUNK, values.size)
        drawn = np.floor(values[start:stop] / per_row[start:stop] + rng.uniforms(stop - start))
        q[start:stop] = np.clip(drawn, -INT8_LIMIT, INT8_LIMIT)
    return q.reshape(x.shape), scales


def _to_bf16(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16).reshape(np.shape(x))


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    wide = np.asarray(bits, np.uint16).reshape(-1).astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32).reshape(np.shape(bits))


def encode_tensors(
    arrays: Mapping[str, np.ndarray], encoding: Encoding, seed: int = 0
) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, np.ndarray]]:
    """Each float32 tensor as ``(dtype code, raw array)``, and the int8 scales by name.

    Tensors of other dtypes pass unchanged, and so do fp32 values. ``EncodingError``
    (``not_finite``) for a lossy encoding of a value that is not finite, or of one
    beyond fp16's range (65504) under fp16.
    """
    rng = SplitMix64(seed)
    out: dict[str, tuple[str, np.ndarray]] = {}
    scales: dict[str, np.ndarray] = {}
    for name in sorted(arrays):
        given = np.asarray(arrays[name])
        x = np.ascontiguousarray(given).reshape(given.shape)  # 0-d stays 0-d
        if x.dtype != np.float32:
            if x.dtype.name not in _CODES:
                raise EncodingError(f"{name} has dtype {x.dtype.name}, which safetensors lacks")
            out[name] = (_CODES[x.dtype.name], x)
            continue
        if encoding is Encoding.fp32:  # as it is: the receiver checks what it must
            out[name] = ("F32", x)
            continue
        if not np.isfinite(x).all():
            raise EncodingError(f"{name} holds NaN or Inf values", code="not_finite")
        if encoding is Encoding.fp16:
            with np.errstate(over="ignore"):  # overflow is refused just below
                half = x.astype(np.float16)
            if not np.isfinite(half).all():
                raise EncodingError(
                    f"{name} holds values beyond fp16's range (±65504)",
                    "use bf16 or fp32 for this model",
                    code="not_finite",
                )
            out[name] = ("F16", half)
        elif encoding is Encoding.bf16:
            brain = _to_bf16(x)
            if ((brain & 0x7F80) == 0x7F80).any():  # rounded up to infinity
                raise EncodingError(f"{name} holds values beyond bf16's range", code="not_finite")
            out[name] = ("BF16", brain)
        else:
            q, s = _int8(x, rng)
            out[name] = ("I8", q)
            scales[name] = s
    return out, scales


# safetensors' dtype codes by numpy's names (bfloat16 travels as raw uint16 bits here).
_CODES = {
    "float32": "F32", "float16": "F16", "float64": "F64", "int8": "I8", "uint8": "U8",
    "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32", "int64": "I64",
    "uint64": "U64", "bool": "BOOL",
}  # fmt: skip
_SPEC_DTYPES = {code: name for name, code in _CODES.items()} | {"BF16": "bfloat16"}


def _serialize(tensors: Mapping[str, tuple[str, np.ndarray]], metadata: Mapping[str, str]) -> bytes:
    """The safetensors bytes of (dtype code, array) tensors, with string ``metadata``."""
    specs = {
        name: TensorSpec(
            dtype=_SPEC_DTYPES[code], shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
        )
        for name, (code, a) in tensors.items()
    }
    return bytes(serialize(specs, metadata=dict(metadata) or None))


def payload_metadata(encoding: Encoding, scales: Mapping[str, np.ndarray]) -> dict[str, str]:
    """The metadata an encoded payload carries (JSON strings): ``encoding``, int8 ``scales``."""
    meta = {"encoding": json.dumps(encoding.value)}
    if encoding is Encoding.int8:
        meta["scales"] = json.dumps(
            {
                name: base64.b64encode(s.astype("<f4").tobytes()).decode("ascii")
                for name, s in sorted(scales.items())
            },
            separators=(",", ":"),
        )
    return meta


def encode_payload(
    arrays: Mapping[str, np.ndarray],
    encoding: Encoding,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """A safetensors body of ``arrays`` in ``encoding`` (metadata: ``metadata`` plus its own).

    fp32 payloads say nothing about their encoding (as before encodings existed).
    """
    tensors, scales = encode_tensors(arrays, encoding, seed)
    meta = dict(metadata or {})
    if encoding is not Encoding.fp32:
        meta.update(payload_metadata(encoding, scales))
    return _serialize(tensors, meta)


# -- decoding -----------------------------------------------------------------------------------


def declared_encoding(metadata: Mapping[str, str]) -> Encoding:
    """The encoding a payload's metadata declares (none: fp32); ``bad_metadata`` otherwise."""
    text = metadata.get("encoding")
    if text is None:
        return Encoding.fp32
    try:
        value = json.loads(text)
        return Encoding(value)
    except (ValueError, TypeError):
        raise EncodingError(
            f"metadata 'encoding' must be one of {sorted(_NAMES)} as a JSON string",
            'e.g. "encoding": "\\"int8\\""',
            code="bad_metadata",
        ) from None


def parse_scales(
    metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """The int8 scales of ``shapes``' tensors: ``bad_scales`` unless exactly right.

    One base64 entry per tensor, holding ``rows_of(shape)`` little-endian float32
    values, each finite and positive.
    """
    text = metadata.get("scales")
    hint = "send metadata 'scales': {name: base64 of one float32 per output channel}"
    if text is None:
        raise EncodingError("an int8 payload needs metadata 'scales'", hint, code="bad_scales")
    try:
        entries = json.loads(text)
    except (ValueError, RecursionError):
        raise EncodingError("metadata 'scales' is not JSON", hint, code="bad_scales") from None
    if not isinstance(entries, dict) or set(entries) != set(shapes):
        names = set(entries) if isinstance(entries, dict) else set()
        raise EncodingError(
            f"metadata 'scales' must name every int8 tensor (missing "
            f"{sorted(set(shapes) - names)[:3]}, unexpected {sorted(names - set(shapes))[:3]})",
            hint,
            code="bad_scales",
        )
    scales: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        value = entries[name]
        expected = rows_of(shape)
        try:
            raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except (binascii.Error, ValueError):
            raw = None
        if raw is None or len(raw) != 4 * expected:
            raise EncodingError(
                f"{name} needs {expected} scales (one per output channel)",
                hint,
                code="bad_scales",
            )
        s = np.frombuffer(raw, "<f4").astype(np.float32)
        if not (np.isfinite(s).all() and (s > 0).all()):
            raise EncodingError(
                f"{name} has scales that are NaN, infinite, zero or negative",
                "every scale is max|row| / 127, or 1 for a row of zeros",
                code="bad_scales",
            )
        scales[name] = s
    return scales


def decode_tensors(
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    encoding: Encoding,
    metadata: Mapping[str, str],
    names: Iterable[str] | None = None,
) -> Arrays:
    """float32 arrays of safetensors ``entries`` (``safetensors.deserialize``) in ``encoding``.

    ``names`` are the tensors that must be in the encoding (default: every
    floating one); others pass through as their dtype. ``EncodingError`` for a
    dtype other than the encoding's, bad int8 scales or a value that is not finite.
    """
    items = {name: info for name, info in entries}
    encoded = (
        set(names)
        if names is not None
        else {n for n, info in items.items() if info["dtype"] in ("F32", "F16", "BF16", "I8")}
    )
    for name in sorted(encoded):
        dtype = items[name]["dtype"]
        if dtype != encoding.dtype:
            raise EncodingError(
                f"{name} has dtype {_SPEC_DTYPES.get(dtype, dtype)}, the payload's encoding "
                f"{encoding.value} sends {_SPEC_DTYPES[encoding.dtype]}",
                "encode every tensor as the encoding says",
                code="bad_dtype",
            )
    scales = (
        parse_scales(metadata, {n: tuple(items[n]["shape"]) for n in encoded})
        if encoding is Encoding.int8
        else {}
    )
    out: Arrays = {}
    for name, info in items.items():
        shape = tuple(info["shape"])
        data = info["data"]
        if name not in encoded:
            out[name] = np.frombuffer(data, _NUMPY[info["dtype"]]).reshape(shape)
            continue
        if encoding is Encoding.fp32:
            values = np.frombuffer(data, "<f4").reshape(shape)
        elif encoding is Encoding.fp16:
            values = np.frombuffer(data, "<f2").astype(np.float32).reshape(shape)
        elif encoding is Encoding.bf16:
            values = _from_bf16(np.frombuffer(data, "<u2")).reshape(shape)
        else:
            rows = rows_of(shape)
            q = np.frombuffer(data, np.int8).reshape(rows, len(data) // rows if rows else 0)
            with np.errstate(over="ignore"):  # huge scales: refused as not finite below
                values = (q.astype(np.float32) * scales[name][:, None]).reshape(shape)
        if not np.isfinite(values).all():
            raise EncodingError(f"{name} holds NaN or Inf values", code="not_finite")
        out[name] = values.astype(np.float32, copy=False)
    return out


_NUMPY = {
    "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I8": "i1", "U8": "u1", "F64": "<f8",
    "I64": "<i8", "I32": "<i4", "U32": "<u4", "I16": "<i2", "U16": "<u2", "U64": "<u8",
    "BOOL": "?",
}  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    """A payload read back: float32 arrays, its encoding and its string metadata."""

    arrays: Arrays
    encoding: Encoding
    metadata: dict[str, str]


def decode_payload(body: bytes) -> Decoded:
    """An encoded safetensors body as float32 arrays (``EncodingError`` if it does not decode)."""
    try:
        entries = deserialize(body)
        header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
    except (SafetensorError, ValueError, TypeError) as exc:
        raise EncodingError(f"not a safetensors payload: {exc}") from None
    metadata = header.get("__metadata__") or {}
    encoding = declared_encoding(metadata)
    return Decoded(decode_tensors(entries, encoding, metadata), encoding, dict(metadata))


# -- updates ------------------------------------------------------------------------------------


def make_update(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> Arrays:
    """``trained - received`` in float32, for every trained tensor."""
    return {name: np.subtract(trained[name], received[name], dtype=np.float32) for name in trained}


def apply_update(received: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
    """The weights a device sent as an update: ``received + delta`` in float32."""
    with np.errstate(over="ignore"):  # an overflow is the receiver's to refuse (not finite)
        return {name: np.add(received[name], delta[name], dtype=np.float32) for name in delta}


class UpdateEncoder:
    """A device's uploads: lossy ones as updates, with the error-feedback residual.

    The residual (what quantization dropped from the last lossy upload, in
    float32) is kept for one level: a task at another level, an fp32 upload, a
    task without error feedback or an upload that did not arrive (``forget``)
    drops it.
    """

    def __init__(self) -> None:
        self._level: str | None = None
        self._residual: Arrays = {}

    @property
    def residual(self) -> Arrays:
        return dict(self._residual)

    @property
    def level(self) -> str | None:
        """The level the residual belongs to (None: no residual)."""
        return self._level

    def restore(self, level: str | None, residual: Mapping[str, np.ndarray]) -> None:
        """Take back a residual saved from ``level`` and ``residual`` (a resumed run)."""
        self._level = level
        self._residual = {n: np.array(a, np.float32) for n, a in residual.items()} if level else {}

    def forget(self) -> None:
        self._level, self._residual = None, {}

    def encode(
        self,
        trained: Mapping[str, np.ndarray],
        received: Mapping[str, np.ndarray],
        encoding: Encoding,
        seed: int,
        level: str,
        error_feedback: bool,
        metadata: Mapping[str, str],
    ) -> bytes:
        """The upload body of a session that started from ``received`` and ended at ``trained``.

        fp32: the trained weights themselves. Otherwise the update (differential
        privacy would clip it here), plus the residual with error feedback, encoded
        with the task's rounding ``seed``.
        """
        if not encoding.lossy:
            self.forget()
            return encode_payload(trained, encoding, seed, metadata)
        update = make_update(trained, received)
        if error_feedback and self._level == level and self._residual.keys() == update.keys():
            update = {n: np.add(u, self._residual[n], dtype=np.float32) for n, u in update.items()}
        tensors, scales = encode_tensors(update, encoding, seed)
        if error_feedback:
            sent = decode_tensors(
                _entries(tensors), encoding, payload_metadata(encoding, scales), update
            )
            self._residual = {
                n: np.subtract(u, sent[n], dtype=np.float32) for n, u in update.items()
            }
            self._level = level
        else:
            self.forget()
        return _serialize(tensors, {**metadata, **payload_metadata(encoding, scales)})


def _entries(tensors: Mapping[str, tuple[str, np.ndarray]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, {"dtype": code, "shape": list(a.shape), "data": a.tobytes()})
        for name, (code, a) in tensors.items()
    ]


# -- bytes on the wire --------------------------------------------------------------------------


class TransferLog:
    """Bytes of weights sent down and results sent up, per round, direction and encoding.

    ``kind`` tells training payloads (``train``) from the statistics phase's
    (``statistics``); with a ``device``, its bytes that round are kept too.
    """

    def __init__(self) -> None:
        self._rounds: dict[int, dict[tuple[str, str, str], list[int]]] = {}
        self._devices: dict[int, dict[str, dict[str, int]]] = {}

    def add(
        self,
        round_number: int,
        direction: str,
        kind: str,
        encoding: str,
        size: int,
        device: str | None = None,
    ) -> None:
        entry = self._rounds.setdefault(round_number, {}).setdefault(
            (direction, kind, encoding), [0, 0]
        )
        entry[0] += int(size)
        entry[1] += 1
        if device is not None:
            sizes = self._devices.setdefault(round_number, {}).setdefault(device, {})
            sizes[direction] = sizes.get(direction, 0) + int(size)

    def round(self, round_number: int) -> dict[str, Any]:
        """``{direction: {kind: {encoding: {"bytes", "payloads"}}}, "devices": {id: {...}}}``."""
        out: dict[str, Any] = {"down": {}, "up": {}}
        for (direction, kind, encoding), (size, count) in sorted(
            self._rounds.get(round_number, {}).items()
        ):
            out[direction].setdefault(kind, {})[encoding] = {"bytes": size, "payloads": count}
        out["devices"] = {
            device: {"down": sizes.get("down", 0), "up": sizes.get("up", 0)}
            for device, sizes in sorted(self._devices.get(round_number, {}).items())
        }
        return out

    def device(self, round_number: int, device: str) -> dict[str, int] | None:
        """``{"down", "up"}`` bytes of one device in a round (None if it moved none)."""
        sizes = self._devices.get(round_number, {}).get(device)
        return None if sizes is None else {"down": sizes.get("down", 0), "up": sizes.get("up", 0)}

    def to_json(self) -> dict[str, Any]:
        return {str(n): self.round(n) for n in sorted(self._rounds)}

    def load(self, data: Mapping[str, Any]) -> None:
        """Rounds from ``to_json`` (a resumed run)."""
        for number, entry in data.items():
            for direction in ("down", "up"):
                for kind, encodings in entry.get(direction, {}).items():
                    for encoding, sizes in encodings.items():
                        self._rounds.setdefault(int(number), {})[(direction, kind, encoding)] = [
                            int(sizes["bytes"]),
                            int(sizes["payloads"]),
                        ]
            for device, sizes in entry.get("devices", {}).items():
                self._devices.setdefault(int(number), {})[device] = dict(sizes)


def training_bytes_per_device(transfer: Mapping[str, Any]) -> dict[str, float]:
    """Mean bytes down, up and in all per training payload pair of a round's ``transfer``."""
    sums = {}
    for direction in ("down", "up"):
        entries = transfer.get(direction, {}).get("train", {}).values()
        size = sum(e["bytes"] for e in entries)
        count = sum(e["payloads"] for e in entries)
        sums[direction] = size / count if count else math.nan
    sums["total"] = sums["down"] + sums["up"]
    return sums
