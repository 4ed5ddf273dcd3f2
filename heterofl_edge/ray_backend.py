"""Client sessions as Ray tasks: the simulation on one machine or a cluster (optional extra).

``pip install heterofl-edge[ray]``, then ``simulate --backend ray``: each
client's local session, and each run of clients' statistics, is a Ray task
(one CPU, or one GPU with ``--accelerator cuda``). The training examples go
into Ray's object store once per run and each worker process reads them once.
Outcomes come back in task order, so the model is the same bits as with the
local backend.

``address=None`` starts a private Ray on this machine, bound to the loopback
interface, without usage statistics, token authentication or dashboard, and
stops it at the end. ``address="auto"`` or ``"HOST:PORT"`` joins a running
cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379``
on the others) and leaves it running.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from heterofl_edge.backends import available_cores, longest_first
from heterofl_edge.errors import ConfigError
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
)

ray: Any = None  # imported on first use, after the environment of a private Ray is set

__all__ = ["LOCAL_RAY_ENVIRONMENT", "RayBackend", "import_ray"]

# A private Ray on one machine: nothing leaves it, nothing phones home. Ray reads these when
# it is imported, so they must be set before (``import_ray(local=True)`` does).
LOCAL_RAY_ENVIRONMENT = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def import_ray(local: bool) -> Any:
    """The ``ray`` module; for a private Ray (``local``), first the environment above."""
    global ray
    if ray is None:
        if local:
            for key, value in LOCAL_RAY_ENVIRONMENT.items():
                os.environ.setdefault(key, value)
        try:
            ray = importlib.import_module("ray")
        except ImportError:  # the optional extra is not installed
            raise ConfigError(
                "--backend ray needs Ray, which is not installed",
                "pip install 'heterofl-edge[ray]' (or use --backend local)",
            ) from None
    return ray


# Per worker process: the training examples of the run, read once from the object store.
_DATA: dict[str, ClientArrays] = {}


def _data(holder: list[Any]) -> ClientArrays:
    (ref,) = holder
    key = ref.hex()
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = import_ray(local=False).get(ref)  # in a worker, Ray is imported already
    return _DATA[key]


def _train_task(job: TrainJob, holder: list[Any], device: str) -> TrainOutcome:
    return run_training(job, _data(holder), device)


def _stats_task(job: StatsJob, holder: list[Any], device: str) -> StatsOutcome:
    return run_statistics(job, _data(holder), device)


def _predict_task(job: PredictJob, device: str) -> np.ndarray:
    return run_prediction(job, device)


class RayBackend:
    """Sessions as Ray tasks; see the module docstring."""

    def __init__(
        self,
        data: ClientArrays,
        device: str = "cpu",
        address: str | None = None,
        workers: int | None = None,
    ) -> None:
        import_ray(local=address is None)
        self.device = device
        self._started = False
        if not ray.is_initialized():
            if address is None:
                ray.init(
                    num_cpus=workers or available_cores(),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    log_to_driver=False,
                )
            else:
                ray.init(address=address, log_to_driver=False)
            self._started = True
        resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        self._train = ray.remote(**resources)(_train_task)
        self._stats = ray.remote(**resources)(_stats_task)
        self._predict = ray.remote(**resources)(_predict_task)
        self._holder = [ray.put(data)]
        cluster = ray.cluster_resources()
        self._workers = max(1, int(cluster.get("GPU" if device == "cuda" else "CPU", 1)))

    @property
    def workers(self) -> int:
        return self._workers

    def train(self, jobs: Sequence[TrainJob]) -> Iterator[TrainOutcome]:
        refs: dict[int, Any] = {}
        for i in longest_first(jobs):
            refs[i] = self._train.remote(jobs[i], self._holder, self.device)
        return _in_order([refs[i] for i in range(len(jobs))])

    def statistics(self, jobs: Sequence[StatsJob]) -> Iterator[StatsOutcome]:
        return _in_order([self._stats.remote(job, self._holder, self.device) for job in jobs])

    def predict(self, jobs: Sequence[PredictJob]) -> Iterator[np.ndarray]:
        return _in_order([self._predict.remote(job, self.device) for job in jobs])

    def close(self) -> None:
        self._holder = []
        if self._started:
            ray.shutdown()
            self._started = False


def _in_order(refs: list[Any]) -> Iterator[Any]:
    """Results in list order; a consumer that stops early cancels what is left."""
    done = 0
    try:
        for ref in refs:
            yield ray.get(ref)
            done += 1
    finally:
        for ref in refs[done:]:
            ray.cancel(ref)
