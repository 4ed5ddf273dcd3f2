"""Prometheus metrics of one coordinator, served at ``/metrics`` (prometheus-client).

Names end in a unit or ``_total``; labels are bounded sets (endpoint, method,
kind, code, state, level, direction, encoding), never device ids. Each coordinator has its own
registry, so that several apps in one process (tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CoordinatorMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_WORK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _DeviceCollector(Collector):
    def __init__(self, count: Callable[[], dict[tuple[str, str], int]]) -> None:
        self._count = count

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "heterofl_devices", "Registered devices by state and level.", labels=["state", "level"]
        )
        for (state, level), value in sorted(self._count().items()):
            family.add_metric([state, level], value)
        yield family


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rounds = Counter(
            "heterofl_rounds_total",
            "Rounds by what happened to them: started, finished, failed.",
            ["state"],
            registry=self.registry,
        )
        self.uploads = Counter(
            "heterofl_uploads_total",
            "Device results by kind (update, statistics) and outcome (accepted or error code).",
            ["kind", "code"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "heterofl_bytes_total",
            "Bytes of request and response bodies (direction in or out).",
            ["direction"],
            registry=self.registry,
        )
        self.payload_bytes = Counter(
            "heterofl_payload_bytes_total",
            "Bytes of tensor payloads: weights sent down, results received up, by kind "
            "(train, statistics) and encoding (fp32, fp16, bf16, int8).",
            ["direction", "kind", "encoding"],
            registry=self.registry,
        )
        self.payloads = Counter(
            "heterofl_payloads_total",
            "Tensor payloads, as heterofl_payload_bytes_total: bytes per device-round is "
            "their ratio.",
            ["direction", "kind", "encoding"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "heterofl_request_seconds",
            "Time to answer a request, by endpoint and method.",
            ["endpoint", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.aggregation_seconds = Histogram(
            "heterofl_aggregation_seconds",
            "Time to finalise a round's aggregate.",
            buckets=_WORK_BUCKETS,
            registry=self.registry,
        )
        self.dp_epsilon = Gauge(
            "heterofl_dp_epsilon",
            "Differential privacy spent so far: epsilon at the run's delta (private runs only).",
            registry=self.registry,
        )
        self.evaluation_seconds = Histogram(
            "heterofl_evaluation_seconds",
            "Time to evaluate the global model after a round.",
            buckets=_WORK_BUCKETS,
            registry=self.registry,
        )

    def count_payload(self, direction: str, kind: str, encoding: str, size: int) -> None:
        """One payload on the wire: weights served (down) or a result accepted (up)."""
        self.payload_bytes.labels(direction, kind, encoding).inc(size)
        self.payloads.labels(direction, kind, encoding).inc()

    def watch_devices(self, count: Callable[[], dict[tuple[str, str], int]]) -> None:
        """Report devices by (state, level) at every scrape."""
        self.registry.register(_DeviceCollector(count))
