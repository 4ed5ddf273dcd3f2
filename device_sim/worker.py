"""One device, from its data to the coordinator's last round: ``heterofl-edge device``.

Loads MNIST with numpy, takes shard ``shard`` of the run's split (the same
split the in-process simulation makes from the same seed), and runs a
``Device`` against the coordinator. torch is never imported (unless the
device's runtime is one that needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_sim.device import Capabilities, Device
from device_sim.protocol import CoordinatorClient, ProtocolError, TokenRefused
from heterofl_edge.data.idx import read_split
from heterofl_edge.errors import ConfigError
from heterofl_edge.partition import Split, train_shards

__all__ = ["EXIT_ERROR", "EXIT_TOKEN_REFUSED", "WorkerConfig", "run_worker"]

EXIT_ERROR = 2  # the coordinator answered with an error the device cannot get past
EXIT_TOKEN_REFUSED = 4  # the coordinator no longer knows this device (e.g. a fresh state)


@dataclass(frozen=True)
class WorkerConfig:
    coordinator: str
    data_dir: Path
    cache: Path
    shard: int = 0
    clients: int = 1  # the split's number of shards; 1: all of the training data
    split: Split = Split.iid
    seed: int = 0
    train_examples: int | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)


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
    train_x, train_y = read_split(config.data_dir, "train")
    keep, shards = train_shards(
        train_y,
        config.clients,
        config.split,
        10,
        config.seed,
        train_examples=config.train_examples,
    )
    indices = keep[shards.indices[config.shard]]
    capabilities = config.capabilities
    client = CoordinatorClient(
        config.coordinator, config.cache, bandwidth_mbps=capabilities.bandwidth_mbps
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
