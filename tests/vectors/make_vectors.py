"""Check, or with --write regenerate, the vectors that Python and JS tests share.

* ``shuffle.json``: the batch-order generator of ``heterofl_edge/batching.py``
  (SplitMix64, Lemire's bounded draw, Fisher-Yates); 64-bit values are decimal
  strings (JSON numbers lose them past 2**53 in JS).
* ``normalise.json``: the float32 bits of ``heterofl_edge.data.idx.normalise`` for
  the 256 pixel values.
* ``standardise.json``: the float32 bits a device computes from uint8 demo pixels and
  the shard's ``normalise`` rule (``coordinator.demo_data.Normalise.apply``, the
  arithmetic of ``heterofl_edge/data/image_arrays.py``), per channel, for a few rules.
* ``secagg.json``: secure aggregation's arithmetic and one whole instance of four
  reproducible clients (``secagg_vectors.py``), for ``web/secagg.js``.
* ``encoding.json``: the transport encodings of ``heterofl_edge/encoding.py``: the
  rounding uniforms, fp16 and bf16 bits of chosen float32 values (ties, subnormals,
  the overflow edge), int8 tensors (values, scales, seed: q and scales), and two
  lossy uploads in a row with error feedback. float32 values travel as their bits.
* ``safetensors/``: files written by Python's ``safetensors`` library and the
  values they hold (``expected.json``). The JS test writes the same tensors again,
  which must give the same bytes (up to the order of metadata keys, which Python
  leaves to a Rust HashMap).

``tests/test_vectors.py`` and ``web/test/*.test.js`` check them. Run from the
repository root::

    python tests/vectors/make_vectors.py          # exit 1 if a file is out of date
    python tests/vectors/make_vectors.py --write  # rewrite them (a deliberate change)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load, save

from heterofl_edge.batching import SplitMix64, epoch_batches
from heterofl_edge.data.idx import normalise

sys.path.insert(0, str(Path(__file__).parent))
from secagg_vectors import secagg_vectors

FOLDER = Path(__file__).parent
SAFETENSORS = FOLDER / "safetensors"

STREAMS = [0, 1, 1234567, 2**32 - 1]
# Bounds near 2**31 reject about half of the draws, so the rejection loop is exercised.
BOUNDS = [1, 2, 3, 7, 10, 1000, 2**31 + 1, 2**31 + 1, 2**31 + 1, 3 * 2**30, 2**32 - 1, 2**32]
SESSIONS = [  # seed, examples, epochs, batch size
    (0, 0, 2, 4),
    (0, 1, 2, 1),
    (1, 10, 2, 3),
    (7, 16, 1, 16),
    (2**32 - 1, 17, 3, 5),
    (2718281828, 100, 2, 32),
    (42, 600, 1, 10),
]


def shuffle_vectors() -> dict[str, Any]:
    streams = []
    for seed in STREAMS:
        rng = SplitMix64(seed)
        streams.append({"seed": seed, "next64": [str(rng.next64()) for _ in range(4)]})
    below = []
    for seed in (0, 99):
        rng = SplitMix64(seed)
        values = [rng.below(b) for b in BOUNDS]
        below.append(
            {"seed": seed, "bounds": BOUNDS, "values": values, "state_after": str(rng.state)}
        )
    sessions = [
        {
            "seed": seed,
            "num_examples": n,
            "epochs": epochs,
            "batch_size": batch,
            "batches": [b.tolist() for b in epoch_batches(n, epochs, batch, seed)],
        }
        for seed, n, epochs, batch in SESSIONS
    ]
    return {
        "about": "Batch-order generator of heterofl_edge/batching.py (SplitMix64, Lemire's "
        "bounded draw, Fisher-Yates). Regenerate only with "
        "tests/vectors/make_vectors.py --write.",
        "splitmix64": streams,
        "below": below,
        "epoch_batches": sessions,
    }


def normalise_vectors() -> dict[str, Any]:
    bits = normalise(np.arange(256, dtype=np.uint8)).view(np.uint32)
    return {
        "about": "float32 bits (as uint32) of heterofl_edge.data.idx.normalise(p), p = 0..255",
        "bits": [int(b) for b in bits],
    }


STANDARDISE_RULES = [  # (mean, std) per channel, float32 values as image_arrays computes them
    ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # CIFAR-10's usual statistics
    ((0.5,), (1.0,)),  # std 1: an image folder of one colour
    ((0.1307,), (0.3081,)),  # MNIST's
]


def standardise_vectors() -> dict[str, Any]:
    from coordinator.demo_data import Normalise

    cases = []
    for mean, std in STANDARDISE_RULES:
        mean32 = [float(np.float32(m)) for m in mean]
        std32 = [float(np.float32(s)) for s in std]
        rule = Normalise(255, tuple(mean32), tuple(std32))
        pixels = np.tile(np.arange(256, dtype=np.uint8), (1, len(mean), 1))  # [1, C, 256]
        bits = rule.apply(pixels).view(np.uint32)[0]
        cases.append(
            {
                "normalise": json.loads(rule.to_json()),
                "bits": [[int(b) for b in channel] for channel in bits],
            }
        )
    return {
        "about": "float32 bits (as uint32) of (p / scale - mean_c) / std_c in float32, "
        "p = 0..255, per channel: the demo data's 'normalise' rule",
        "cases": cases,
    }


def _bits(values: np.ndarray) -> list[int]:
    return [int(b) for b in np.ascontiguousarray(values, np.float32).reshape(-1).view(np.uint32)]


def _float32(bits: list[int]) -> np.ndarray:
    return np.array(bits, np.uint32).view(np.float32)


HALF_EDGES = [  # float32 bit patterns where fp16 rounding is delicate
    0x00000000, 0x80000000, 0x3F800000, 0xBF800000, 0x477FE000, 0x477FEFFF, 0x477FF000,
    0x477FF001, 0x33800000, 0x33000000, 0x33000001, 0x337FFFFF, 0x387FC000, 0x38800000,
    0x3A800800, 0x3A801000, 0x3A802000, 0x3A801800, 0x3F801000, 0x3F803000, 0x3F802FFF,
    0x00000001, 0x2F800000, 0xC77FE000, 0x38000000, 0x387FE000, 0x387FF000,
]  # fmt: skip


def encoding_vectors() -> dict[str, Any]:
    from heterofl_edge.batching import SplitMix64
    from heterofl_edge.encoding import Encoding, UpdateEncoder, encode_tensors, payload_metadata

    rng = np.random.default_rng(31)
    uniforms = [
        {"seed": seed, "values": [float(u) for u in SplitMix64(seed).uniforms(6)]}
        for seed in (0, 1, 123456789, 2**32 - 1)
    ]
    probes = np.concatenate([_float32(HALF_EDGES), rng.normal(0, 3, 40).astype(np.float32)]).astype(
        np.float32
    )
    probes = np.concatenate([probes, rng.normal(0, 1e-5, 20).astype(np.float32)])
    with np.errstate(over="ignore"):
        in_range = probes[np.isfinite(probes.astype(np.float16))]
    fp16 = {
        "float32": _bits(in_range),
        "half": [int(b) for b in in_range.astype(np.float16).view(np.uint16)],
    }
    bf16_values = np.concatenate(
        [probes, _float32([0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7F7FFF, 0xFF7F0000])]
    ).astype(np.float32)
    bf16_tensors, _ = encode_tensors({"x": bf16_values}, Encoding.bf16)
    bf16 = {"float32": _bits(bf16_values), "bf16": [int(b) for b in bf16_tensors["x"][1]]}
    tensors = {
        "b.weight": rng.normal(0, 0.05, (3, 2, 2, 2)).astype(np.float32),
        "a.bias": rng.normal(0, 1, 5).astype(np.float32),
        "c.scalar": np.array(-0.75, np.float32),
        "d.zeros": np.zeros((2, 3), np.float32),
        "e.linear": rng.normal(0, 2, (4, 7)).astype(np.float32),
    }
    tensors["e.linear"][1, 3] = 0.0
    tensors["e.linear"][2] *= 1e-30  # tiny values: a scale near float32's smallest normals
    int8 = []
    for seed in (0, 7, 2**32 - 1):
        encoded, scales = encode_tensors(tensors, Encoding.int8, seed)
        int8.append(
            {
                "seed": seed,
                "q": {n: [int(v) for v in a.reshape(-1)] for n, (_, a) in encoded.items()},
                "scales": {n: _bits(s) for n, s in scales.items()},
                "metadata": payload_metadata(Encoding.int8, scales),
            }
        )
    inputs = {n: {"shape": list(t.shape), "bits": _bits(t)} for n, t in tensors.items()}
    received = {
        "w": rng.normal(0, 1, (4, 6)).astype(np.float32),
        "b": rng.normal(0, 1, 4).astype(np.float32),
    }
    sessions = []
    encoder = UpdateEncoder()
    start = received
    for step, seed in enumerate((11, 12, 13)):
        trained = {
            n: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for n, v in start.items()
        }
        level = "e" if step < 2 else "d"  # the third session's level differs: residual dropped
        body = encoder.encode(trained, start, Encoding.int8, seed, level, True, {})
        header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
        sessions.append(
            {
                "seed": seed,
                "level": level,
                "received": {n: _bits(a) for n, a in start.items()},
                "trained": {n: _bits(a) for n, a in trained.items()},
                "q": {n: [int(v) for v in info["data"]] for n, info in sorted(_int8_entries(body))},
                "metadata": dict(sorted(header["__metadata__"].items())),
                "residual_after": {n: _bits(a) for n, a in encoder.residual.items()},
            }
        )
        start = trained
    return {
        "about": "Transport encodings of heterofl_edge/encoding.py; float32 values as uint32 "
        "bits. Regenerate only with tests/vectors/make_vectors.py --write.",
        "uniforms": uniforms,
        "fp16": fp16,
        "bf16": bf16,
        "int8": {"tensors": inputs, "cases": int8},
        "error_feedback": {
            "shapes": {n: list(a.shape) for n, a in received.items()},
            "sessions": sessions,
        },
    }


def _int8_entries(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    from safetensors import deserialize

    return [(n, {"data": np.frombuffer(i["data"], np.int8)}) for n, i in deserialize(body)]


def render(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, separators=(",", ":")) + "\n"


def safetensors_cases() -> dict[str, tuple[dict[str, np.ndarray], dict[str, str] | None]]:
    mixed = {
        "weight": np.arange(6, dtype=np.float32).reshape(2, 3) / np.float32(7),
        "scalar": np.array(-1.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "double": np.array([np.pi, -0.0], np.float64),
        "labels": np.array([0, -3, 2**62 + 1], np.int64),
        "ints": np.array([-(2**31), 2**31 - 1], np.int32),
        "pixels": np.array([0, 7, 255], np.uint8),
        "signed": np.array([-128, 127], np.int8),
        "short": np.array([1, 65535], np.uint16),
        "half": np.array([1.0, -2.5], np.float16),
        "flags": np.array([True, False, True]),
        "0": np.array([1.0], np.float32),  # a name JSON.stringify would put first
        "Zeta": np.array([2.0], np.float32),  # uppercase sorts before lowercase
        "é.bias": np.array([3.0], np.float32),  # non-ASCII sorts by UTF-8 bytes
    }
    metadata = {"note": 'quote " backslash \\ newline \n tab \t bell \x07 é ∑ 😀'}
    upload = {
        "blocks.0.conv.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 1, 2, 2),
        "linear.bias": np.array([0.25, -0.5], np.float32),
    }
    upload_meta = {
        "num_samples": json.dumps(600),
        "labels": json.dumps([0, 3, 9]),
        "metrics": json.dumps({"loss": 1.25, "accuracy": 0.5, "steps": 60}),
    }
    return {
        "mixed": (mixed, None),
        "metadata": ({"x": np.array([1.0, 2.0], np.float32)}, metadata),
        "empty_metadata": ({"x": np.array([1.0], np.float32)}, {}),
        "nothing": ({}, None),
        "upload": (upload, upload_meta),
    }


def describe(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> dict[str, Any]:
    def values(a: np.ndarray) -> list[Any]:
        flat = a.reshape(-1)
        if a.dtype == np.float16:
            return [int(v) for v in flat.view(np.uint16)]  # raw bits, as JS reads them
        if a.dtype in (np.int64, np.uint64):
            return [str(int(v)) for v in flat]  # past 2**53
        if a.dtype == np.bool_:
            return [int(v) for v in flat]
        return [float(v) if a.dtype.kind == "f" else int(v) for v in flat]

    return {
        "metadata": metadata,
        "tensors": {n: {"shape": list(t.shape), "values": values(t)} for n, t in tensors.items()},
    }


def json_files() -> dict[Path, str]:
    """The JSON files and their exact text."""
    described = {
        name: describe(tensors, metadata)
        for name, (tensors, metadata) in safetensors_cases().items()
    }
    return {
        FOLDER / "shuffle.json": render(shuffle_vectors()),
        FOLDER / "normalise.json": render(normalise_vectors()),
        FOLDER / "standardise.json": render(standardise_vectors()),
        FOLDER / "secagg.json": render(secagg_vectors()),
        FOLDER / "encoding.json": render(encoding_vectors()),
        SAFETENSORS / "expected.json": json.dumps(described, indent=1, ensure_ascii=False) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the files")
    args = parser.parse_args()
    stale = []
    for path, text in json_files().items():
        if args.write:
            path.write_text(text)
        elif not path.is_file() or path.read_text() != text:
            stale.append(path)
    for name, (tensors, metadata) in safetensors_cases().items():
        path = SAFETENSORS / f"{name}.safetensors"
        if args.write:
            path.write_bytes(save(tensors, metadata=metadata))
        elif not path.is_file() or not _same(load(path.read_bytes()), tensors):
            stale.append(path)
    if args.write:
        print(f"wrote the vectors under {FOLDER}")
        return 0
    if stale:
        print("out of date: " + ", ".join(str(p) for p in stale))
        print("rerun with --write if the change is meant")
        return 1
    print(f"the vectors under {FOLDER} are up to date")
    return 0


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


if __name__ == "__main__":
    sys.exit(main())
