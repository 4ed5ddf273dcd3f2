"""Client sessions of the simulation as plain work: local training and the sBN statistics pass.

Local training is the model's task (``heterofl_edge.tasks``): classification
or the masked language model, chosen from the architecture the job names.

A session takes plain data (numbers and numpy arrays), runs with exactly one
torch thread on its device, and returns plain data. The same session therefore
gives the same bits in this process, in a worker process or as a Ray task on
another machine, whatever the number of workers: float reductions depend on the
thread count, so it is fixed here, not left to the host.

On a CPU the forward-only passes (sBN statistics, evaluation) run in the
channels-last memory format: oneDNN's convolutions are faster there at level
a, a float32 reordering of the same computation. Training keeps the default layout: with
its per-batch gathers, channels-last measured 1.14x faster at level a but 4x
slower at level e on this project's CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn

from heterofl_edge.batching import stats_batches
from heterofl_edge.bn_stats import ChannelMoments, collect_moments
from heterofl_edge.errors import ConfigError
from heterofl_edge.loss import label_mask
from heterofl_edge.models import get_architecture
from heterofl_edge.tasks import task_for
from heterofl_edge.training import LocalTrainingConfig, predict

__all__ = [
    "Accelerator",
    "ClientArrays",
    "PredictJob",
    "StatsJob",
    "StatsOutcome",
    "TrainJob",
    "TrainOutcome",
    "forward_layout",
    "memory_format",
    "moments_from",
    "place",
    "resolve_device",
    "run_prediction",
    "run_statistics",
    "run_training",
    "session_threads",
]

Arrays = dict[str, np.ndarray]


class Accelerator(StrEnum):
    """Where client sessions run: ``auto`` takes CUDA when torch sees a GPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def resolve_device(accelerator: Accelerator | str) -> str:
    """``"cpu"`` or ``"cuda"``; ``ConfigError`` when CUDA is asked for and absent."""
    choice = Accelerator(accelerator)
    if choice is Accelerator.cuda and not torch.cuda.is_available():
        raise ConfigError(
            "--accelerator cuda, but torch sees no CUDA device",
            "use --accelerator cpu or auto, or a CUDA build of torch on a GPU machine",
        )
    if choice is Accelerator.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice.value


@dataclass(frozen=True)
class ClientArrays:
    """The training examples in play; workers hold them once.

    Classification: float32 inputs and int64 labels. Language model: int64 token
    rows in both (the task masks the inputs itself).
    """

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class TrainJob:
    """One client's local session: its level's slice of the global model and its examples."""

    client: str
    model: str
    rate: float
    global_rate: float
    lr: float
    seed: int
    indices: np.ndarray  # into ClientArrays
    labels_held: tuple[int, ...]
    num_classes: int
    local: LocalTrainingConfig
    state: Arrays

    @property
    def cost(self) -> float:
        """Relative work (for scheduling the longest sessions first): examples x rate^2."""
        return len(self.indices) * self.rate**2


@dataclass(frozen=True)
class TrainOutcome:
    client: str
    update: Arrays  # the trained parameters
    num_samples: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class StatsJob:
    """The sBN statistics of the global model on each of ``clients``' examples."""

    model: str
    global_rate: float
    state: Arrays
    clients: tuple[str, ...]
    indices: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class PredictJob:
    """The global model's evaluation-mode outputs for ``inputs``, a run of the test examples."""

    model: str
    global_rate: float
    state: Arrays
    inputs: np.ndarray


# Per client, in job order: (client, {layer: (count, mean, var)}).
StatsOutcome = list[tuple[str, dict[str, tuple[int, np.ndarray, np.ndarray]]]]


@contextlib.contextmanager
def session_threads(count: int = 1) -> Iterator[None]:
    """Run the body with ``count`` torch threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on ``array``'s memory (copied when read-only, as Ray's zero-copy arrays are)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def to_arrays(state: Mapping[str, torch.Tensor]) -> Arrays:
    return {name: t.detach().cpu().numpy() for name, t in state.items()}


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: as_tensor(a) for name, a in arrays.items()}


class _Placed:
    """``ClientArrays`` as tensors on one device, made once per process and device."""

    _cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # noqa: RUF012

    @classmethod
    def get(cls, data: ClientArrays, device: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(data), device)
        if key not in cls._cache:
            cls._cache.clear()  # one data set per process at a time
            cls._cache[key] = (
                as_tensor(data.images).to(device),
                as_tensor(data.labels).to(device),
            )
        return cls._cache[key]


def memory_format(device: str) -> torch.memory_format:
    """For forward passes: channels-last on a CPU (faster convolutions), else the default."""
    return torch.channels_last if device == "cpu" else torch.contiguous_format


def forward_layout(inputs: torch.Tensor, device: str) -> torch.Tensor:
    """``inputs`` contiguous for a forward pass; image batches in ``device``'s memory format."""
    if inputs.dim() == 4:
        return inputs.contiguous(memory_format=memory_format(device))
    return inputs.contiguous()


def place(model: nn.Module, device: str) -> nn.Module:
    """``model`` on ``device`` in that device's memory format (in place)."""
    model.to(device)
    # nn.Module.to accepts memory_format at run time; its type stubs do not say so.
    return model.to(memory_format=memory_format(device))  # type: ignore[call-overload]


def _configure(device: str) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def run_training(job: TrainJob, data: ClientArrays, device: str = "cpu") -> TrainOutcome:
    """Train ``job``'s sub-model on its examples: E epochs of its task's local SGD."""
    start = time.perf_counter()
    _configure(device)
    arch = get_architecture(job.model)
    images, labels = _Placed.get(data, device)
    model = arch.build(job.rate, job.global_rate)
    model.load_state_dict(to_tensors(job.state))
    model.to(device)
    index = as_tensor(job.indices).to(device)
    x = images.index_select(0, index)
    y = labels.index_select(0, index)
    mask = label_mask(list(job.labels_held), job.num_classes).to(device)
    torch.manual_seed(job.seed)  # any randomness in training (dropout) follows the task
    result = task_for(arch).train_local(model, x, y, job.lr, job.local, mask, job.seed)
    update = {name: p.detach().cpu().contiguous().numpy() for name, p in model.named_parameters()}
    return TrainOutcome(
        job.client,
        update,
        result.num_examples,
        result.mean_loss,
        result.accuracy,
        time.perf_counter() - start,
    )


def run_statistics(job: StatsJob, data: ClientArrays, device: str = "cpu") -> StatsOutcome:
    """Each client's sBN moments under the global model, over its examples in batches of 500.

    The batches (500 consecutive examples of the client's, the last one short)
    define the statistics: deeper layers see inputs normalised with the batch's
    moments. Images run in the device's forward layout (``memory_format``:
    channels-last on a CPU, 1.2x faster per image at level a, 1.67 against 1.96 ms
    on one thread in ``bench/bench_simulate.py``); the sBN layers take the moments
    in that layout as precisely as the default layout's double accumulation
    (``collect_moments``).
    """
    _configure(device)
    arch = get_architecture(job.model)
    images, _ = _Placed.get(data, device)
    model = place(arch.build(job.global_rate, job.global_rate), device)
    model.load_state_dict(to_tensors(job.state))
    outcome: StatsOutcome = []
    for client, indices in zip(job.clients, job.indices, strict=True):
        local = images.index_select(0, as_tensor(indices).to(device))
        batches = (forward_layout(local[s], device) for s in stats_batches(len(local)))
        moments = collect_moments(model, batches)
        outcome.append(
            (
                client,
                {
                    layer: (m.count, m.mean.cpu().numpy(), m.var.cpu().numpy())
                    for layer, m in moments.items()
                },
            )
        )
    return outcome


def run_prediction(job: PredictJob, device: str = "cpu") -> np.ndarray:
    """The outputs (logits) of the global model in evaluation mode for ``job.inputs``.

    In batches of ``EVAL_BATCH`` from the first input, in the device's forward
    layout: a test set cut into runs of whole batches gives the same bits
    however many workers score it.
    """
    _configure(device)
    arch = get_architecture(job.model)
    model = place(arch.build(job.global_rate, job.global_rate), device)
    model.load_state_dict(to_tensors(job.state))
    inputs = forward_layout(as_tensor(job.inputs).to(device), device)
    return predict(model, inputs).cpu().numpy()


def moments_from(
    report: Mapping[str, tuple[int, np.ndarray, np.ndarray]],
) -> dict[str, ChannelMoments]:
    """A client's statistics report back as ``ChannelMoments``."""
    return {
        layer: ChannelMoments(int(count), as_tensor(mean), as_tensor(var))
        for layer, (count, mean, var) in report.items()
    }
