"""One device, from its data to the coordinator's last round: ``heterofl-edge device``.

Loads its training data with numpy (MNIST's idx files, an image folder with
Pillow, exported arrays, or WikiText-2's text for the language model), takes
shard ``shard`` of the run's split (the same split the in-process simulation
makes from the same seed), and runs a ``Device``
against the coordinator. torch is never imported (unless the device's
runtime is one that needs it).

With a state folder (``state_dir``) the registration outlives the process:
a restart resumes it (same device id, same token, the task it had), a
refused token (the coordinator lost its state) registers again, and a state
folder of another coordinator run is refused. A coordinator that stays away
longer than ``unreachable_seconds`` ends the process with
``EXIT_UNREACHABLE``, which a service manager restarts; the user's mistakes
end it with ``ConfigError`` (exit 2), which it should not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from device_sim.device import Capabilities, Device
from device_sim.protocol import (
    DEFAULT_UNREACHABLE_SECONDS,
    CoordinatorClient,
    CoordinatorUnreachable,
    ProtocolError,
    TokenRefused,
)
from device_sim.state import DeviceIdentity, StateDir, new_identity
from heterofl_edge.data.arrays import read_training_arrays
from heterofl_edge.data.idx import locate, normalise, read_idx
from heterofl_edge.data.image_arrays import read_image_folder
from heterofl_edge.data.text_rows import read_wikitext2_rows
from heterofl_edge.errors import ConfigError, DataError
from heterofl_edge.partition import Split, stretch_partition, train_shards
from heterofl_edge.protocol import ErrorCode

__all__ = [
    "EXIT_ERROR",
    "EXIT_TOKEN_REFUSED",
    "EXIT_UNREACHABLE",
    "DeviceData",
    "WorkerConfig",
    "device_examples",
    "run_worker",
]

EXIT_ERROR = 2  # the coordinator answered with an error the device cannot get past
EXIT_TOKEN_REFUSED = 4  # the coordinator no longer knows this device (e.g. a fresh state)
EXIT_UNREACHABLE = 5  # the coordinator stayed away past --unreachable-timeout: restart later
# Registration refusals that name the device's settings, which only its user can change.
_REFUSED_SETTINGS = frozenset(
    {
        ErrorCode.insufficient_memory,
        ErrorCode.bad_profile,
        ErrorCode.unsupported_runtime,
    }
)


class DeviceData(StrEnum):
    """The training data a device reads from ``data_dir``."""

    mnist = "mnist"  # the four idx files
    imagefolder = "imagefolder"  # train/CLASS/*.png|jpg (the coordinator's --data imagefolder)
    arrays = "arrays"  # train.safetensors from 'heterofl-edge data export' (any data set)
    wikitext2 = "wikitext2"  # train.txt, valid.txt, test.txt (the language model's token rows)


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    data_dir: Path
    cache: Path
    data: DeviceData = DeviceData.mnist
    image_size: int = 32  # imagefolder: images are resized to this many pixels square
    channels: int = 3  # imagefolder: 3 (RGB) or 1 (greyscale)
    shard: int = 0
    clients: int = 1  # the split's number of shards; 1: all of the training data
    split: Split = Split.iid
    seed: int = 0
    train_examples: int | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    enrollment_token: str | None = None  # where the coordinator requires one to register
    ca_cert: Path | None = None  # the certificate of a coordinator with a self-signed one
    unreachable_seconds: float = DEFAULT_UNREACHABLE_SECONDS  # ride out restarts this long
    state_dir: Path | None = None  # keep the registration here, resume it after a restart
    max_memory_mb: float | None = None  # never train a level whose training would exceed it


def run_worker(config: WorkerConfig, log: Callable[[str], None] | None = None) -> int:
    """Register (or resume) and work until the coordinator says done; the process's exit code.

    The user's mistakes (data, options, a state folder that is not this
    device's or is another coordinator run's) raise ``HeteroFLError``; the
    coordinator's refusals are logged and give ``EXIT_TOKEN_REFUSED``,
    ``EXIT_UNREACHABLE`` or ``EXIT_ERROR``.
    """
    name = f"device {config.shard}"

    def say(message: str) -> None:
        if log is not None:
            log(f"{name}: {message}")
        else:
            print(f"{name}: {message}", flush=True)

    if config.clients < 1 or not 0 <= config.shard < config.clients:
        raise ConfigError(
            f"shard {config.shard} is outside 0..{config.clients - 1}",
            "--shard counts from 0 and stays below --clients",
        )
    if config.max_memory_mb is not None and not config.max_memory_mb > 0:
        raise ConfigError(f"--max-memory-mb must be positive, got {config.max_memory_mb:g}")
    state = None if config.state_dir is None else StateDir(config.state_dir)
    identity = None if state is None else state.load()
    images, labels = device_examples(config)
    capabilities = config.capabilities
    client = CoordinatorClient(
        config.coordinator,
        config.cache,
        retry_seconds=config.unreachable_seconds,
        bandwidth_mbps=capabilities.bandwidth_mbps,
        ca_cert=config.ca_cert,
        enrollment_token=config.enrollment_token,
        log=say,
    )
    device = Device(
        client,
        images,
        labels,
        capabilities,
        seed=config.seed + config.shard,
        log=say,
        memory_limit_mb=config.max_memory_mb,
    )
    del images, labels
    session = _Session(device, state, config)
    try:
        session.start(identity)
        while True:
            try:
                device.run()
                break
            except TokenRefused as exc:
                if state is None:
                    raise
                say(f"token refused ({exc.message}); registering again")
                session.register()
    except TokenRefused as exc:
        say(f"token refused ({exc.message}); exiting")
        return EXIT_TOKEN_REFUSED
    except CoordinatorUnreachable as exc:
        say(f"error: {exc}")
        return EXIT_UNREACHABLE
    except ProtocolError as exc:
        if exc.code in _REFUSED_SETTINGS:  # the user's to fix: one line, exit code 2
            raise ConfigError(
                f"the coordinator refused this device: {exc.message.split(': ', 1)[-1]}",
                exc.hint,
            ) from None
        say(f"error: {exc}")
        return EXIT_ERROR
    say(f"bytes sent {client.bytes_sent}, received {client.bytes_received}")
    return 0


class _Session:
    """The device's registration: made, kept in the state folder, resumed, made again."""

    def __init__(self, device: Device, state: StateDir | None, config: WorkerConfig) -> None:
        self.device = device
        self.state = state
        self.url = config.coordinator.rstrip("/")
        # What the coordinator placed this device by: a change means registering anew.
        self.settings = {
            "runtime": config.capabilities.runtime,
            "max_memory_mb": config.max_memory_mb,
        }

    def start(self, identity: DeviceIdentity | None) -> None:
        """Resume ``identity`` if it is this coordinator run's and still fits, else register."""
        if identity is None or self.state is None:
            self.register()
            return
        health = self.device.client.health()  # waits through an absent coordinator
        self.state.check_run(identity, self.url, health.run_id)
        if identity.settings != self.settings:
            changed = ", ".join(
                f"{k} {identity.settings.get(k)} -> {v}"
                for k, v in self.settings.items()
                if identity.settings.get(k) != v
            )
            self.device.log(f"settings changed since registering ({changed}); registering again")
            self.register()
            return
        if identity.coordinator != self.url:
            self.device.log(f"the coordinator moved from {identity.coordinator} to {self.url}")
            identity = dataclasses.replace(identity, coordinator=self.url)
            self.state.save(identity)
        self.device.resume(identity)

    def register(self) -> None:
        """Register anew; with a state folder, keep the registration.

        A device registered before registers again only with the same
        coordinator run (its token was refused after a repair, or its settings
        changed); another run's coordinator is refused (``ConfigError``).
        """
        stored = None if self.state is None else self.state.load()
        if self.state is not None and stored is not None:
            self.state.check_run(stored, self.url, self.device.client.health().run_id)
        reply = self.device.register()
        if self.state is None:
            return
        run_id = self.device.health.run_id if self.device.health is not None else None
        self.state.save(
            new_identity(
                reply.device_id,
                reply.token,
                self.url,
                run_id,
                reply.poll_seconds,
                reply.heartbeat_seconds,
                reply.max_rate,
                reply.max_level,
                self.settings,
            )
        )


def device_examples(config: WorkerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The device's training examples and labels: its shard of the run's split.

    MNIST is read as bytes and only the shard is converted to floats, so the
    whole training set never sits in memory as float32 (188 MB).
    """
    if config.data is DeviceData.mnist:
        return _mnist_shard(config)
    train_x, train_y, num_classes = _training_data(config)
    indices = _shard(config, train_y, num_classes)
    return train_x[indices], train_y[indices]


def _shard(config: WorkerConfig, train_y: np.ndarray, num_classes: int) -> np.ndarray:
    if config.data is DeviceData.wikitext2:  # token rows: the language model's split
        keep, shards = stretch_partition(
            train_y, config.clients, config.split, config.seed, config.train_examples
        )
    else:
        keep, shards = train_shards(
            train_y,
            config.clients,
            config.split,
            num_classes,
            config.seed,
            train_examples=config.train_examples,
        )
    indices: np.ndarray = keep[shards.indices[config.shard]]
    return indices


def _mnist_shard(config: WorkerConfig) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's training shard, as ``read_split`` gives it for the whole set (same values)."""
    images = read_idx(locate(config.data_dir, "train-images-idx3-ubyte"))
    labels = read_idx(locate(config.data_dir, "train-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"MNIST train files disagree: images {images.shape}, labels {labels.shape}",
            "fetch both files again",
        )
    if labels.size and labels.max() > 9:
        raise DataError(
            f"MNIST train labels go up to {labels.max()}, expected 0..9", "fetch the file again"
        )
    train_y = labels.astype(np.int64)
    indices = _shard(config, train_y, 10)
    return normalise(images[indices])[:, None], train_y[indices]


def _training_data(config: WorkerConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Examples, labels and classes of an image folder, exported arrays or WikiText-2."""
    if config.data is DeviceData.imagefolder:
        arrays = read_image_folder(config.data_dir, config.image_size, config.channels, test=False)
        return arrays.train_x, arrays.train_y, len(arrays.classes)
    if config.data is DeviceData.arrays:
        return read_training_arrays(config.data_dir)
    # wikitext2 (MNIST is read by _mnist_shard): inputs and targets are the same token rows
    text = read_wikitext2_rows(config.data_dir)
    return text.train, text.train, len(text.vocabulary)
