"""One device, from its data to the coordinator's last round: ``heterofl-edge device``.

Loads its training data with numpy (MNIST's idx files, an image folder with
Pillow, exported arrays, or WikiText-2's text for the language model), takes
shard ``shard`` of the run's split (the same split the in-process simulation
makes from the same seed), and runs a ``Device``
against the coordinator. torch is never imported (unless the device's
runtime is one that needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from device_sim.device import Capabilities, Device
from device_sim.protocol import (
    DEFAULT_UNREACHABLE_SECONDS,
    CoordinatorClient,
    ProtocolError,
    TokenRefused,
)
from heterofl_edge.data.arrays import read_training_arrays
from heterofl_edge.data.idx import read_split
from heterofl_edge.data.image_arrays import read_image_folder
from heterofl_edge.data.text_rows import read_wikitext2_rows
from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import Split, stretch_partition, train_shards

__all__ = ["EXIT_ERROR", "EXIT_TOKEN_REFUSED", "DeviceData", "WorkerConfig", "run_worker"]

EXIT_ERROR = 2  # the coordinator answered with an error the device cannot get past
EXIT_TOKEN_REFUSED = 4  # the coordinator no longer knows this device (e.g. a fresh state)


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


def run_worker(config: WorkerConfig, log: Callable[[str], None] | None = None) -> int:
    """Register and work until the coordinator says done; the process's exit code.

    The user's mistakes (data, options) raise ``HeteroFLError``; the
    coordinator's refusals are logged and give ``EXIT_TOKEN_REFUSED`` or
    ``EXIT_ERROR``.
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
    train_x, train_y, num_classes = _training_data(config)
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
    indices = keep[shards.indices[config.shard]]
    capabilities = config.capabilities
    client = CoordinatorClient(
        config.coordinator,
        config.cache,
        retry_seconds=config.unreachable_seconds,
        bandwidth_mbps=capabilities.bandwidth_mbps,
        ca_cert=config.ca_cert,
        enrollment_token=config.enrollment_token,
    )
    device = Device(
        client,
        train_x[indices],
        train_y[indices],
        capabilities,
        seed=config.seed + config.shard,
        log=say,
    )
    try:
        device.register()
        device.run()
    except TokenRefused as exc:
        say(f"token refused ({exc.message}); exiting")
        return EXIT_TOKEN_REFUSED
    except ProtocolError as exc:
        say(f"error: {exc}")
        return EXIT_ERROR
    say(f"bytes sent {client.bytes_sent}, received {client.bytes_received}")
    return 0


def _training_data(config: WorkerConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Training examples, labels and number of classes, as the coordinator's data set has them."""
    if config.data is DeviceData.imagefolder:
        arrays = read_image_folder(config.data_dir, config.image_size, config.channels, test=False)
        return arrays.train_x, arrays.train_y, len(arrays.classes)
    if config.data is DeviceData.arrays:
        return read_training_arrays(config.data_dir)
    if config.data is DeviceData.wikitext2:  # inputs and targets are the same token rows
        text = read_wikitext2_rows(config.data_dir)
        return text.train, text.train, len(text.vocabulary)
    train_x, train_y = read_split(config.data_dir, "train")
    return train_x, train_y, 10
