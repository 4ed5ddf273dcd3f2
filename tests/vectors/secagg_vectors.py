"""The secure aggregation vectors (``secagg.json``) that numpy and the browser share.

Deterministic: private keys are fixed scalars and every random draw of a
client (its self-mask seed, Shamir's coefficients, nonces) comes from a
SHA-256 counter stream, so a JS client given the same keys and the same stream
must produce the same bytes. ``make_vectors.py`` writes and checks the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from heterofl_edge.secagg import (
    SALT,
    FixedPoint,
    LayoutPlan,
    SecAggClient,
    SecAggServer,
    Segment,
    VectorLayout,
    combine_shares,
    derive_key,
    embedding,
    encode_wide,
    prg,
    split_secret,
    statistics_vector,
    training_vector,
)


def stream(label: str) -> Callable[[int], bytes]:
    """Bytes from SHA-256(label | counter), 32 at a time: a reproducible ``random``."""
    state = {"counter": 0, "buffer": b""}

    def draw(count: int) -> bytes:
        while len(state["buffer"]) < count:
            block = hashlib.sha256(f"{label}|{state['counter']}".encode()).digest()
            state["buffer"] += block
            state["counter"] += 1
        out, state["buffer"] = state["buffer"][:count], state["buffer"][count:]
        return out

    return draw


def _layout(segments: list[tuple[str, tuple[int, ...], tuple[int, ...]]], presence: int = 0):
    return VectorLayout(tuple(Segment(n, s, b) for n, s, b in segments), presence)


def _layout_json(layout: VectorLayout) -> dict[str, Any]:
    return {
        "segments": [
            {"name": s.name, "shape": list(s.shape), "blocks": list(s.blocks)}
            for s in layout.segments
        ],
        "presence": layout.presence,
    }


def _scalar(label: str) -> int:
    """A valid P-256 private scalar from a label."""
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return int.from_bytes(hashlib.sha256(label.encode()).digest(), "big") % (order - 1) + 1


def secagg_vectors() -> dict[str, Any]:
    prg_cases = []
    for label, count in (("a", 8), ("b", 5), ("c", 100_000)):
        key = hashlib.sha256(label.encode()).digest()
        words = prg(key, count)
        prg_cases.append(
            {
                "key": key.hex(),
                "count": count,
                "head": words[:8].tolist(),
                "sum": int(words.astype(np.uint64).sum() % 2**32),
                "last": int(words[-1]),
            }
        )
    hkdf = [
        {
            "secret": s.hex(),
            "purpose": p,
            "context": c,
            "key": derive_key(s, p, c).hex(),
        }
        for s, p, c in (
            (b"\x01" * 32, "self mask", "round 1 training 00"),
            (bytes(range(32)), "pair mask", "ctx"),
            (b"\xff" * 32, "shares", "round 2 statistics ab"),
        )
    ]
    fixed = FixedPoint(2.0**27, 1.0)
    values = [0.0, 1.0, -1.0, 2.5, -3.0, 0.5 / 2**27, 1.5 / 2**27, -0.5 / 2**27, 1e-3, -0.123456789]
    fixed_cases = {
        "scale": fixed.scale,
        "clip": fixed.clip,
        "values": values,
        "encoded": fixed.encode(np.array(values)).tolist(),
    }
    wide_values = [0.0, 1.0, -1.0, 12345.678, -98765.4321, 2.0**40, 0.5 / 2**16]
    wide = {
        "scale": 2.0**16,
        "values": wide_values,
        "digits": encode_wide(np.array(wide_values), 2.0**16).tolist(),
    }
    small = _layout([("w", (2, 3), (1, 1)), ("h", (4, 2), (2, 1)), ("f", (3,), (0,))], 2)
    large = _layout([("w", (4, 5), (1, 1)), ("h", (8, 3), (2, 1)), ("f", (3,), (0,))], 4)
    embeddings = [
        {
            "small": _layout_json(small),
            "large": _layout_json(large),
            "positions": embedding(small, large).tolist(),
        }
    ]
    secret = 0x0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF
    shares = split_secret(secret, [1, 2, 3, 5, 8], 3, stream("shamir"))
    shamir = {
        "secret": str(secret),
        "threshold": 3,
        "shares": {str(x): str(y) for x, y in shares.items()},
        "first_coefficient_bytes": stream("shamir")(80).hex(),
    }
    assert combine_shares({x: shares[x] for x in (2, 5, 8)}) == secret
    return {
        "vectors": vector_cases(),
        "salt": SALT.decode(),
        "prg": prg_cases,
        "hkdf": hkdf,
        "fixed_point": fixed_cases,
        "wide": wide,
        "embedding": embeddings,
        "shamir": shamir,
        "protocol": protocol_vectors(),
    }


def protocol_vectors() -> dict[str, Any]:
    """One instance of four clients (levels 6, 4, 4, 2 elements) where client 4 drops."""
    context = "round 7 training 0123456789abcdef"
    sizes = {"1": 6, "2": 4, "3": 4, "4": 2}
    layouts = {n: _layout([("w", (k,), (1,))]) for n, k in sizes.items()}
    server = SecAggServer(context, list(layouts.items()), layouts["1"], 0.5, 99)
    clients = {
        n: SecAggClient(
            context,
            server.index[n],
            stream(f"client {n}"),
            (_scalar(f"c {n}"), _scalar(f"s {n}")),
        )
        for n in layouts
    }
    adverts = {n: c.advertise() for n, c in clients.items()}
    for n, a in adverts.items():
        server.accept_advertisement(n, a)
    share_requests = server.close_advertisement()
    shared = {}
    for n, request in share_requests.items():
        shared[n] = clients[n].share_keys(request.neighbours, request.threshold)
        server.accept_shares(n, shared[n])
    mask_requests = server.close_shares()
    vectors = {n: (np.arange(k, dtype=np.uint32) * 1000 + int(n)) for n, k in sizes.items()}
    masked = {}
    for n, request in mask_requests.items():
        masked[n] = clients[n].mask(vectors[n], layouts[n], request.peers, request.ciphertexts)
        if n != "4":  # client 4 masks but never uploads
            server.accept_masked(n, masked[n])
    unmask_requests = server.close_masked()
    revealed = {}
    for n, request in unmask_requests.items():
        revealed[n] = clients[n].unmask(request.dropped, request.survivors)
        server.accept_unmask(n, revealed[n])
    total = server.finalize()
    expected = np.zeros(6, np.uint32)
    for n in ("1", "2", "3"):
        expected[: sizes[n]] += vectors[n]
    assert np.array_equal(total, expected)
    return {
        "context": context,
        "threshold": share_requests["1"].threshold,
        "clients": {
            n: {
                "index": server.index[n],
                "c_private": format(_scalar(f"c {n}"), "064x"),
                "s_private": format(_scalar(f"s {n}"), "064x"),
                "random_label": f"client {n}",
                "c_public": adverts[n].c_public.hex(),
                "s_public": adverts[n].s_public.hex(),
                "layout": _layout_json(layouts[n]),
                "neighbours": sorted(share_requests[n].neighbours),
                "shares_sent": {str(v): blob.hex() for v, blob in shared[n].items()},
                "vector": vectors[n].tolist(),
                "peers": sorted(mask_requests[n].peers),
                "masked": masked[n].tolist(),
                "unmask": None
                if n not in unmask_requests
                else {
                    "dropped": list(unmask_requests[n].dropped),
                    "survivors": list(unmask_requests[n].survivors),
                    "shares": {str(v): str(x) for v, x in revealed[n].items()},
                },
            }
            for n in layouts
        },
        "sum": total.tolist(),
    }


def vector_cases() -> dict[str, Any]:
    """A training vector (label split, presence tiers) and a statistics vector."""
    plan = LayoutPlan(
        names=("w", "cls"),
        blocks={"w": (1, 0), "cls": (0, 1)},
        shapes={
            0.5: {"w": (2, 3), "cls": (4, 2)},
            1.0: {"w": (4, 3), "cls": (4, 4)},
        },
        label_dims={"cls": 0},
        classes=4,
        tiers=(0.5, 1.0),
    )
    rng = np.random.default_rng(5)
    update = {
        "w": rng.normal(0, 0.7, (2, 3)),
        "cls": rng.normal(0, 0.7, (4, 2)).astype(np.float32).astype(np.float64),
    }
    update["w"][0, 0] = 1.5  # clipped
    fixed = FixedPoint(2.0**20, 1.0)
    layers = [("n0", 2), ("n1", 3)]
    stats = {
        "n0.count": np.array([37.0]),
        "n0.mean": np.array([0.25, -1.5]),
        "n0.var": np.array([2.0, 0.125]),
        "n1.count": np.array([37.0]),
        "n1.mean": rng.normal(0, 1, 3).astype(np.float32).astype(np.float64),
        "n1.var": rng.uniform(0.1, 2, 3).astype(np.float32).astype(np.float64),
    }
    return {
        "plan": plan.to_json(),
        "rate": 0.5,
        "scale": fixed.scale,
        "clip": fixed.clip,
        "labels": [1, 3],
        "update": {n: [float(x) for x in v.reshape(-1)] for n, v in update.items()},
        "training": training_vector(update, plan, 0.5, fixed, [1, 3]).tolist(),
        "layers": [list(x) for x in layers],
        "statistics": {k: [float(x) for x in v] for k, v in stats.items()},
        "statistics_scale": 2.0**16,
        "statistics_vector": statistics_vector(stats, layers, 2.0**16).tolist(),
    }
