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
from safetensors.numpy import save

from coordinator.board import _masking
from device_sim.device import Device
from heterofl_edge.batching import SplitMix64
from heterofl_edge.engine import SecureInput
from heterofl_edge.protocol import SecAggPeer, SecAggTask, StatisticsTask, TrainTask
from heterofl_edge.secagg import (
    SALT,
    FixedPoint,
    LayoutPlan,
    Quantizer,
    SecAggClient,
    SecAggServer,
    Segment,
    VectorLayout,
    b64,
    combine_shares,
    derive_key,
    embedding,
    encode_wide,
    prg,
    shared_int8_for,
    split_secret,
    statistics_layout,
    statistics_vector,
    training_vector,
    unb64,
)

ROUNDING_SEED = 0xC0FFEE  # the int8 cases' rounding seed


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
        "device": device_vectors(),
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
    plan = _toy_plan()
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
        # int8: the same update in steps of 1/127, rounded with SplitMix64(rounding_seed)
        "rounding_seed": ROUNDING_SEED,
        "training_int8": training_vector(
            update, plan, 0.5, shared_int8_for(4, 1.0), [1, 3], SplitMix64(ROUNDING_SEED)
        ).tolist(),
        "layers": [list(x) for x in layers],
        "statistics": {k: [float(x) for x in v] for k, v in stats.items()},
        "statistics_scale": 2.0**16,
        "statistics_vector": statistics_vector(stats, layers, 2.0**16).tolist(),
    }


def _toy_plan() -> LayoutPlan:
    """Two tensors at rates 0.5 and 1.0, a classifier split over four labels."""
    return LayoutPlan(
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


def _stage(context: str, index: int, stage: str, **extra: Any) -> SecAggTask:
    """A stage's task as the coordinator sends it (coordinator.board's _stage_task)."""
    return SecAggTask(
        round=7,
        phase="training" if "training" in context else "statistics",
        stage=stage,
        context=context,
        index=index,
        answer_url="/v1/rounds/7/secagg",
        deadline=1e9,
        heartbeat_seconds=5.0,
        **extra,
    )


def _device_instance(
    context: str,
    rates: dict[str, float],
    layout_of: Callable[[float], VectorLayout],
    device: Device,
    masked_input: Callable[..., Any],
    modulus_bits: int = 32,
) -> dict[str, Any]:
    """One instance where client "d" is the Python device, "p1".."p3" protocol clients.

    "p3" shares its keys and drops before uploading, so the device's unmask answer
    holds an ``s``-key share (of p3) and seed shares (of the survivors). The
    device's answers go through ``Device._secagg_answer``; ``masked_input(secure)``
    gives its masked vector through the device's own masking, the task's
    ``SecureMasking`` JSON and the inputs behind the vector.
    """
    layouts = {n: layout_of(r) for n, r in rates.items()}
    server = SecAggServer(
        context, list(layouts.items()), layout_of(1.0), 0.5, 11, modulus_bits=modulus_bits
    )
    index = server.index
    keys = (_scalar(f"c d {context}"), _scalar(f"s d {context}"))
    label = f"device {context}"
    mine = SecAggClient(context, index["d"], stream(label), keys)
    device._secagg[context] = mine  # what its advertise stage would have made, reproducibly
    advert = mine.advertise()
    others = {
        n: SecAggClient(
            context, index[n], stream(f"{n} {context}"), (_scalar(f"c {n}"), _scalar(f"s {n}"))
        )
        for n in rates
        if n != "d"
    }
    server.accept_advertisement("d", advert)
    for n, c in others.items():
        server.accept_advertisement(n, c.advertise())
    requests = server.close_advertisement()
    share_task = _stage(
        context,
        index["d"],
        "share",
        threshold=requests["d"].threshold,
        neighbours=[
            SecAggPeer(index=v, c_public=b64(a.c_public), s_public=b64(a.s_public))
            for v, a in requests["d"].neighbours.items()
        ],
    )
    share_answer = device._secagg_answer(share_task)
    assert share_answer is not None and share_answer.shares is not None
    server.accept_shares("d", {int(v): unb64(x) for v, x in share_answer.shares.items()})
    for n, c in others.items():
        server.accept_shares(n, c.share_keys(requests[n].neighbours, requests[n].threshold))
    mask_requests = server.close_shares()
    rate_of = {index[n]: r for n, r in rates.items()}
    secure = SecureInput(context, index["d"], mask_requests["d"], rates=rate_of)
    masked, secure_json, inputs = masked_input(secure)
    server.accept_masked("d", masked)
    for n, c in others.items():
        request = mask_requests[n]
        vector = np.arange(layouts[n].size, dtype=np.uint32) * 7 + index[n]
        out = c.mask(vector, layouts[n], request.peers, request.ciphertexts, modulus_bits)
        if n != "p3":  # p3 masks but never uploads: the survivors reveal its s key
            server.accept_masked(n, out)
    unmask_requests = server.close_masked()
    request = unmask_requests["d"]
    unmask_task = _stage(
        context,
        index["d"],
        "unmask",
        dropped=list(request.dropped),
        survivors=list(request.survivors),
    )
    unmask_answer = device._secagg_answer(unmask_task)
    assert unmask_answer is not None and unmask_answer.unmask is not None
    server.accept_unmask("d", {int(v): int(x) for v, x in unmask_answer.unmask.items()})
    for n, c in others.items():
        if n in unmask_requests:
            r = unmask_requests[n]
            server.accept_unmask(n, c.unmask(r.dropped, r.survivors))
    server.finalize()  # the device's masked vector unmasks with the others'
    return {
        "context": context,
        "index": index["d"],
        "c_private": format(keys[0], "064x"),
        "s_private": format(keys[1], "064x"),
        "random_label": label,
        "advertise": {
            "context": context,
            "stage": "advertise",
            "c_public": b64(advert.c_public),
            "s_public": b64(advert.s_public),
        },
        "share_task": share_task.model_dump(mode="json"),
        "share_answer": share_answer.model_dump(mode="json", exclude_none=True),
        "secure": secure_json,
        **inputs,
        "masked": masked.tolist(),
        # the upload's bytes, as device_sim's CoordinatorClient.upload sends them
        "upload_sha256": hashlib.sha256(save({"masked": masked}, metadata={})).hexdigest(),
        "unmask_task": unmask_task.model_dump(mode="json"),
        "unmask_answer": unmask_answer.model_dump(mode="json", exclude_none=True),
    }


def device_vectors() -> dict[str, Any]:
    """The Python device's answers and masked uploads in two instances (device_sim.Device).

    Training: the device holds labels 1 and 3 at rate 0.5 beside clients at 1.0, 0.5
    and 1.0; its upload is ``Device._masked_update`` of a received and a trained
    float32 model. Statistics: ``Device._mask`` of the wide-encoded sums, as
    ``Device.statistics`` does. The browser's ``SecAggDevice`` must give the same JSON
    answers and the same vectors from the same task JSON.
    """
    device = Device(
        None, np.zeros((2, 1, 28, 28), np.float32), np.array([3, 1, 3])
    )  # no coordinator: never called
    rng = np.random.default_rng(21)
    plan = _toy_plan()
    fixed = FixedPoint(2.0**20, 1.0)
    shapes = {n: s for n, s in plan.shapes[0.5].items()}
    received = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in shapes.items()}
    trained = {n: (v + rng.normal(0, 0.4, v.shape)).astype(np.float32) for n, v in received.items()}
    trained["w"][0, 1] = received["w"][0, 1] + 2.0  # clipped

    def training(
        secure: SecureInput, quantizer: Quantizer = fixed
    ) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        full = SecureInput(
            secure.context,
            secure.index,
            secure.request,
            fixed=quantizer,
            plan=plan,
            rates=secure.rates,
        )
        masking = _masking(full)
        task = TrainTask.model_construct(
            round=7, rate=0.5, level="b", secure=masking, rounding_seed=ROUNDING_SEED
        )
        masked = device._masked_update(task, masking, received, trained)
        assert masked is not None
        inputs = {
            "rate": 0.5,
            "rounding_seed": ROUNDING_SEED,
            "labels": device.present,
            "received": {n: [float(x) for x in v.reshape(-1)] for n, v in received.items()},
            "trained": {n: [float(x) for x in v.reshape(-1)] for n, v in trained.items()},
        }
        return masked, masking.model_dump(mode="json"), inputs

    layers = [("n0", 2), ("n1", 3)]
    stats = {
        "n0.count": np.array([3.0], np.float32),
        "n0.mean": np.array([0.25, -1.5], np.float32),
        "n0.var": np.array([2.0, 0.125], np.float32),
        "n1.count": np.array([3.0], np.float32),
        "n1.mean": rng.normal(0, 1, 3).astype(np.float32),
        "n1.var": rng.uniform(0.1, 2, 3).astype(np.float32),
    }

    def statistics(secure: SecureInput) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
        full = SecureInput(
            secure.context,
            secure.index,
            secure.request,
            layers=tuple(layers),
            statistics_scale=2.0**16,
        )
        masking = _masking(full)
        task = StatisticsTask.model_construct(round=7, secure=masking)
        layout = statistics_layout(layers)
        vector = statistics_vector(stats, layers, 2.0**16)  # as Device.statistics
        masked = device._mask(task, masking, vector, layout, lambda rate: layout)
        assert masked is not None
        inputs = {"statistics": {k: [float(x) for x in v] for k, v in stats.items()}}
        return masked, masking.model_dump(mode="json"), inputs

    rates = {"d": 0.5, "p1": 1.0, "p2": 0.5, "p3": 1.0}
    return {
        "training": _device_instance(
            "round 7 training 5ec0de", rates, plan.layout, device, training
        ),
        # int8 uploads: four clients' sums in 8 + 2 bits, each upload uint16
        "training_int8": _device_instance(
            "round 7 training int8 5ec0de",
            rates,
            plan.layout,
            device,
            lambda secure: training(secure, shared_int8_for(len(rates), 1.0)),
            shared_int8_for(len(rates), 1.0).modulus_bits,
        ),
        "statistics": _device_instance(
            "round 7 statistics 5ec0de",
            dict.fromkeys(rates, 1.0),
            lambda rate: statistics_layout(layers),
            device,
            statistics,
        ),
    }
