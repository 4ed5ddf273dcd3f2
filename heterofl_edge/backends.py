"""Where the simulation's client sessions run: this process, a pool of processes, or Ray.

A backend takes a round's sessions (``heterofl_edge.sessions``) and returns
their outcomes **in job order**, whatever order they finish in: what finishes
early waits in its future. The engine therefore folds updates and statistics
into its sums in a fixed order, and the model is the same bits for any number
of workers. Sessions start longest first (level a before level e), so that
the round ends as early as the work allows.

* ``InlineBackend``: one session after another in this process (``--workers 1``);
* ``PoolBackend``: N spawned worker processes, each holding the training
  examples once (``--workers N``);
* ``heterofl_edge.ray_backend.RayBackend``: each session a Ray task, on one
  machine or a cluster (``--backend ray``; the optional ``ray`` extra).
"""

from __future__ import annotations

import concurrent.futures as futures
import itertools
import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np

from heterofl_edge.sessions import (
    ClientArrays,
    PredictJob,
    StatsJob,
    StatsOutcome,
    TrainJob,
    TrainOutcome,
    run_prediction,
    run_statistics,
    run_training,
    session_threads,
)

__all__ = [
    "InlineBackend",
    "PoolBackend",
    "SessionBackend",
    "available_cores",
    "longest_first",
    "split_clients",
]

T = TypeVar("T")


class SessionBackend(Protocol):
    """Runs sessions; every iterator yields outcomes in the order of its jobs."""

    @property
    def workers(self) -> int:
        """How many sessions run at once (statistics are split into as many parts, or more)."""

    def train(self, jobs: Sequence[TrainJob]) -> Iterator[TrainOutcome]: ...

    def statistics(self, jobs: Sequence[StatsJob]) -> Iterator[StatsOutcome]: ...

    def predict(self, jobs: Sequence[PredictJob]) -> Iterator[np.ndarray]: ...

    def close(self) -> None: ...


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def longest_first(jobs: Sequence[TrainJob]) -> list[int]:
    """Job positions by decreasing cost, ties in job order (a fixed schedule)."""
    return sorted(range(len(jobs)), key=lambda i: (-jobs[i].cost, i))


def split_clients(sizes: Sequence[int], parts: int) -> list[range]:
    """Consecutive runs of clients with about equal numbers of examples, at most ``parts``."""
    if not sizes:
        return []
    total = sum(sizes)
    parts = max(1, min(parts, len(sizes)))
    bounds, acc, edge = [0], 0, 1
    for i, size in enumerate(sizes):
        acc += size
        if edge < parts and acc >= math.ceil(total * edge / parts) and i + 1 < len(sizes):
            bounds.append(i + 1)
            edge += 1
    bounds.append(len(sizes))
    return [range(a, b) for a, b in itertools.pairwise(bounds) if b > a]


class InlineBackend:
    """Sessions one after another in this process, each with one torch thread."""

    def __init__(self, data: ClientArrays, device: str = "cpu") -> None:
        self.data = data
        self.device = device

    @property
    def workers(self) -> int:
        return 1

    def train(self, jobs: Sequence[TrainJob]) -> Iterator[TrainOutcome]:
        for job in jobs:
            with session_threads(1):
                outcome = run_training(job, self.data, self.device)
            yield outcome

    def statistics(self, jobs: Sequence[StatsJob]) -> Iterator[StatsOutcome]:
        for job in jobs:
            with session_threads(1):
                outcome = run_statistics(job, self.data, self.device)
            yield outcome

    def predict(self, jobs: Sequence[PredictJob]) -> Iterator[np.ndarray]:
        for job in jobs:
            with session_threads(1):
                outputs = run_prediction(job, self.device)
            yield outputs

    def close(self) -> None:
        return None


# The worker side of PoolBackend: what the initializer hands each process.
_WORKER: dict[str, object] = {}


def _start_worker(images: np.ndarray, labels: np.ndarray, device: str) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER.update(data=ClientArrays(images, labels), device=device)


def _train_in_worker(job: TrainJob) -> TrainOutcome:
    data, device = _WORKER["data"], _WORKER["device"]
    assert isinstance(data, ClientArrays) and isinstance(device, str)
    return run_training(job, data, device)


def _stats_in_worker(job: StatsJob) -> StatsOutcome:
    data, device = _WORKER["data"], _WORKER["device"]
    assert isinstance(data, ClientArrays) and isinstance(device, str)
    return run_statistics(job, data, device)


def _predict_in_worker(job: PredictJob) -> np.ndarray:
    device = _WORKER["device"]
    assert isinstance(device, str)
    return run_prediction(job, device)


class PoolBackend:
    """``workers`` spawned processes (a fresh interpreter each, never a fork of this one).

    Each worker receives the training examples once, at start; a session then
    carries only its sub-model and its example indices.
    """

    def __init__(self, data: ClientArrays, workers: int, device: str = "cpu") -> None:
        self._workers = workers
        self._pool = futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(data.images, data.labels, device),
        )

    @property
    def workers(self) -> int:
        return self._workers

    def train(self, jobs: Sequence[TrainJob]) -> Iterator[TrainOutcome]:
        pending: dict[int, futures.Future[TrainOutcome]] = {}
        for i in longest_first(jobs):
            pending[i] = self._pool.submit(_train_in_worker, jobs[i])
        return _in_order([pending[i] for i in range(len(jobs))])

    def statistics(self, jobs: Sequence[StatsJob]) -> Iterator[StatsOutcome]:
        return _in_order([self._pool.submit(_stats_in_worker, job) for job in jobs])

    def predict(self, jobs: Sequence[PredictJob]) -> Iterator[np.ndarray]:
        return _in_order([self._pool.submit(_predict_in_worker, job) for job in jobs])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _in_order(pending: list[futures.Future[T]]) -> Iterator[T]:
    """Results in list order; a consumer that stops early cancels what has not started."""
    done = 0
    try:
        for future in pending:
            yield future.result()
            done += 1
    finally:
        for future in pending[done:]:
            future.cancel()
