"""Benchmark: secure aggregation's cost per round and per device, at 10, 50 and 100 devices.

Protocol-level devices (tests/secagg_helpers.py): they train nothing, they add a
known random update to the slice they received and answer every SecAgg+ stage
as a device does (``heterofl_edge.secagg.SecAggClient``: P-256 keys, Shamir
shares, AES-GCM, AES-CTR masks). MNIST conv, Fix mode a-e in equal parts, two
labels per device (the label split), sBN statistics from the round's devices
(a second secure aggregation). Each size runs one plain round and one secure
round with the same devices and updates, in one process on one core, through
the same round engine that ``simulate`` and the coordinator use, over the
in-process transport (over loopback HTTP against ``coordinator serve``:
``bench_secagg_http.py``).

Figures per size:
- ``plain_seconds``, ``secure_seconds``: the round's wall time, every device's
  work included, run one after the other on one core;
- ``device_seconds``: the devices' secure aggregation work (keys, shares,
  fixed-point encoding, masking, unmasking; summed, and the largest for one
  device, bounded above);
- ``parallel_ratio``: (secure - all devices' secure work + the largest one
  device's) / plain: the round as a fleet runs it, every device on its own
  CPU: what the coordinator adds, plus the slowest device's masking;
- bytes per device and round, up and down, both phases, as raw payloads (no
  HTTP, JSON or base64 overhead): plain = the weights down and up (float32),
  label list, sBN moments; secure adds keys, the neighbours' keys, encrypted
  shares both ways, the unmasking lists and shares, and sends uint32 masked
  vectors (label presence per tier, sBN sums as four 16-bit digits).
Masking cost per level: ``SecAggClient.mask`` of one device at each level among
the degree-20 neighbours of a 100-device round (half of them at each other
level), on one core.

    .venv/bin/python bench/bench_secagg.py            # about 3 minutes here
    .venv/bin/python bench/bench_secagg.py --sizes 10 # a quick look

Writes bench/results/secagg.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from secagg_helpers import ProtocolClients  # noqa: E402

from heterofl_edge import secagg  # noqa: E402
from heterofl_edge.assignment import parse_mode  # noqa: E402
from heterofl_edge.engine import EngineSettings, RoundEngine, StatisticsClients  # noqa: E402
from heterofl_edge.in_process import MemoryJournal  # noqa: E402
from heterofl_edge.levels import rate_label  # noqa: E402
from heterofl_edge.models import get_architecture  # noqa: E402
from heterofl_edge.report import write_json  # noqa: E402
from heterofl_edge.secure_aggregation import SecureSettings, sbn_layers, training_plan  # noqa: E402
from heterofl_edge.slicing import shapes_at, trainable_names  # noqa: E402
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "secagg.json"
LEVELS = (1.0, 0.5, 0.25, 0.125, 0.0625)
KEY = 65  # an uncompressed P-256 point
INDEX = 4  # a client's number in an instance


class Timed:
    """Wraps ``SecAggClient``'s methods: seconds and payload bytes per client instance.

    An instance is one aggregation (training or statistics) of one device, keyed
    by (context, index).
    """

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, int], float] = defaultdict(float)
        self.up: dict[tuple[str, int], int] = defaultdict(int)
        self.down: dict[tuple[str, int], int] = defaultdict(int)
        self.encoding: dict[str, list[float]] = defaultdict(list)  # per call
        self._saved: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        def wrap(name: str, count: Any) -> None:
            original = getattr(secagg.SecAggClient, name)

            def timed_call(client: secagg.SecAggClient, *args: Any) -> Any:
                start = time.perf_counter()
                out = original(client, *args)
                who = (client.context, client.index)
                self.seconds[who] += time.perf_counter() - start
                count(who, args, out)
                return out

            self._saved.append((secagg.SecAggClient, name, original))
            setattr(secagg.SecAggClient, name, timed_call)

        def advertise(who: tuple[str, int], args: Any, out: Any) -> None:
            self.up[who] += 2 * KEY

        def share(who: tuple[str, int], args: Any, out: Any) -> None:
            self.down[who] += len(args[0]) * (INDEX + 2 * KEY) + INDEX  # keys, threshold
            self.up[who] += sum(INDEX + len(blob) for blob in out.values())

        def mask(who: tuple[str, int], args: Any, out: Any) -> None:
            peers, ciphertexts = args[2], args[3]
            self.down[who] += len(peers) * (INDEX + 4)  # each peer's index and level
            self.down[who] += sum(INDEX + len(blob) for blob in ciphertexts.values())
            self.up[who] += 4 * out.size

        def unmask(who: tuple[str, int], args: Any, out: Any) -> None:
            self.down[who] += INDEX * (len(tuple(args[0])) + len(tuple(args[1])))
            self.up[who] += len(out) * (INDEX + secagg.SHARE_BYTES)

        import secagg_helpers

        for name in ("training_vector", "statistics_vector"):  # the devices' encoding
            original = getattr(secagg_helpers, name)

            def encode(*args: Any, _original: Any = original, _name: str = name) -> Any:
                start = time.perf_counter()
                out = _original(*args)
                self.encoding[_name].append(time.perf_counter() - start)
                return out

            self._saved.append((secagg_helpers, name, original))
            setattr(secagg_helpers, name, encode)

        wrap("advertise", advertise)
        wrap("share_keys", share)
        wrap("mask", mask)
        wrap("unmask", unmask)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def run_round(size: int, secure: bool) -> tuple[float, RoundEngine]:
    """One round of ``size`` protocol-level devices, a-e in equal parts; its wall time."""
    arch = get_architecture("conv")
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in arch.build().state_dict().items()}
    labels = [[(2 * i) % 10, (2 * i + 1) % 10] for i in range(size)]
    clients = ProtocolClients(arch.spec, 1.0, labels, dict(sbn_layers(initial)), seed=5)
    per = size // len(LEVELS)
    strategy = HeteroFLStrategy(
        arch.spec,
        parse_mode("-".join(f"{rate_label(r)}{per}" for r in LEVELS)),
        num_clients=size,
        fraction=1.0,
        schedule=MultiStepSchedule(0.1),
        seed=1,
        secure=SecureSettings() if secure else None,
        num_classes=arch.num_classes,
    )
    engine = RoundEngine(
        strategy,
        EngineSettings(rounds=1, statistics=StatisticsClients.round),
        clients,
        MemoryJournal(),
        lambda: {k: v.clone() for k, v in initial.items()},
        clock=time.perf_counter,
    )
    start = time.perf_counter()
    engine.run()
    return time.perf_counter() - start, engine


def payload_bytes(size: int, rate: float) -> dict[str, int]:
    """One device's raw payload bytes in a round at ``rate``, plain and secure (both phases).

    Both download the weights of their level (training) and of the global level
    (statistics). Plain uploads float32 weights, two labels, sBN moments;
    secure uploads the masked training and statistics vectors and, per phase,
    the protocol's messages among ``degree_for(size)`` neighbours.
    """
    arch = get_architecture("conv")
    spec = arch.spec
    names = trainable_names(spec)

    def weights(at: float) -> int:
        shapes = shapes_at(spec, at)
        return 4 * sum(int(np.prod(shapes[n])) for n in names)

    torch.manual_seed(0)
    layers = list(sbn_layers(arch.build().state_dict()))
    plan = training_plan(spec, LEVELS, 1.0, arch.num_classes)
    k = secagg.degree_for(size)
    blob = 12 + 2 * secagg.SHARE_BYTES + 16
    down = weights(rate) + weights(1.0)
    plain_up = weights(rate) + 2 * INDEX + sum(4 * (1 + 2 * c) for _, c in layers)
    protocol_up = 2 * KEY + k * (INDEX + blob) + k * (INDEX + secagg.SHARE_BYTES)
    protocol_down = k * (INDEX + 2 * KEY) + INDEX + k * (INDEX + 4) + k * (INDEX + blob) + k * INDEX
    masked = 4 * plan.layout(rate).size + 4 * secagg.statistics_layout(layers).size
    return {
        "plain": down + plain_up,
        "secure": down + masked + 2 * (protocol_up + protocol_down),
        "protocol_messages": 2 * (protocol_up + protocol_down),
        "masked_vectors": masked,
    }


def measure(size: int) -> dict[str, Any]:
    plain_seconds, plain_engine = run_round(size, secure=False)
    timed = Timed()
    timed.install()
    try:
        secure_seconds, engine = run_round(size, secure=True)
    finally:
        timed.uninstall()

    def gap(keys: list[str], relative: bool) -> float:
        worst = 0.0
        for k in keys:
            a, b = engine.global_state[k].double(), plain_engine.global_state[k].double()
            scale = b.abs().clamp(min=1.0) if relative else 1.0  # relative above 1
            worst = max(worst, float(((a - b).abs() / scale).max()))
        return worst

    state = engine.global_state
    trainable = [k for k in state if "running" not in k and "num_batches" not in k]
    statistics = [k for k in state if "running" in k]
    contexts = sorted({c for c, _ in timed.seconds})
    encodings = timed.encoding.values()
    device_total = sum(timed.seconds.values()) + sum(sum(v) for v in encodings)
    # the slowest device, bounded above: the largest training-instance work plus the
    # largest statistics-instance work, plus the largest encoding of each
    largest = sum(max(v for (c, _), v in timed.seconds.items() if c == ctx) for ctx in contexts)
    largest += sum(max(v) for v in encodings)
    levels = {rate_label(r): payload_bytes(size, r) for r in LEVELS}
    plain_mean = float(np.mean([v["plain"] for v in levels.values()]))
    secure_mean = float(np.mean([v["secure"] for v in levels.values()]))
    # the protocol bytes the devices' calls moved, per device: checks the formula above
    counted = (sum(timed.up.values()) + sum(timed.down.values())) / size
    formula = float(
        np.mean([v["protocol_messages"] + v["masked_vectors"] for v in levels.values()])
    )
    return {
        "devices": size,
        "degree": secagg.degree_for(size),
        "plain_seconds": plain_seconds,
        "secure_seconds": secure_seconds,
        "serial_ratio": secure_seconds / plain_seconds,
        "device_seconds_total": device_total,
        "device_seconds_largest": largest,
        "parallel_ratio": (secure_seconds - device_total + largest) / plain_seconds,
        "bytes_per_device_plain": plain_mean,
        "bytes_per_device_secure": secure_mean,
        "bytes_ratio": secure_mean / plain_mean,
        "bytes_per_level": levels,
        "protocol_bytes_counted": counted,
        "protocol_bytes_formula": formula,
        "weights_gap": gap(trainable, relative=False),
        "statistics_relative_gap": gap(statistics, relative=True),
    }


def masking_cost(size: int = 100, repeats: int = 3) -> dict[str, float]:
    """Seconds of ``SecAggClient.mask`` per level, one core, in a ``size``-device instance."""
    arch = get_architecture("conv")
    plan = training_plan(arch.spec, LEVELS, 1.0, arch.num_classes)
    rates = [LEVELS[i % len(LEVELS)] for i in range(size)]
    names = [str(i) for i in range(size)]
    server = secagg.SecAggServer(
        "bench",
        [(n, plan.layout(r)) for n, r in zip(names, rates, strict=True)],
        plan.layout(1.0),
        0.5,
        11,
    )
    clients = {n: secagg.SecAggClient("bench", server.index[n]) for n in names}
    for n, c in clients.items():
        server.accept_advertisement(n, c.advertise())
    for n, request in server.close_advertisement().items():
        server.accept_shares(n, clients[n].share_keys(request.neighbours, request.threshold))
    requests = server.close_shares()
    out = {}
    rng = np.random.default_rng(0)
    for rate in LEVELS:
        name = names[rates.index(rate)]
        layout = plan.layout(rate)
        vector = rng.integers(0, 2**32, layout.size, dtype=np.uint32)
        request = requests[name]
        best = float("inf")
        for _ in range(repeats):
            fresh = secagg.SecAggClient("bench", server.index[name])
            fresh._neighbours = clients[name]._neighbours  # the keys it shared
            fresh._s_key = clients[name]._s_key
            start = time.perf_counter()
            fresh.mask(vector, layout, request.peers, request.ciphertexts)
            best = min(best, time.perf_counter() - start)
        out[rate_label(rate)] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 50, 100])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for size in args.sizes:
        entry = measure(size)
        runs.append(entry)
        print(
            f"{size} devices (degree {entry['degree']}): plain {entry['plain_seconds']:.2f} s, "
            f"secure {entry['secure_seconds']:.2f} s ({entry['serial_ratio']:.2f}x on one core, "
            f"{entry['parallel_ratio']:.2f}x with devices in parallel); bytes per device "
            f"{entry['bytes_per_device_plain'] / 1e6:.3f} -> "
            f"{entry['bytes_per_device_secure'] / 1e6:.3f} MB ({entry['bytes_ratio']:.3f}x); "
            f"weights gap {entry['weights_gap']:.2e}, sBN gap "
            f"{entry['statistics_relative_gap']:.2e}",
            flush=True,
        )
    masking = masking_cost()
    for level, seconds in masking.items():
        print(f"masking at level {level}: {1000 * seconds:.1f} ms (degree 20, one core)")
    write_json(
        args.out,
        {
            "protocol": (
                "MNIST conv, Fix a-e in equal parts, two labels per device, one round plain and "
                "one secure with the same protocol-level devices (no training), sBN statistics "
                "from the round's devices, in-process transport, one process on one core"
            ),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "runs": runs,
            "masking_seconds_per_level": masking,
        },
    )


if __name__ == "__main__":
    main()
