"""One simulated device as its own process: ``python -m device_sim.worker ...``.

Loads MNIST with numpy, takes shard ``--shard`` of the run's split (the same
split the in-process simulation makes from the same seed), and runs a
``Device`` against the coordinator. torch is never imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from device_sim.device import Capabilities, Device
from device_sim.protocol import CoordinatorClient, ProtocolError, TokenRefused
from heterofl_edge.data.idx import read_split
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.partition import Split, train_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="device_sim.worker")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--split", choices=[s.value for s in Split], default="iid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-examples", type=int, default=None)
    parser.add_argument("--capabilities", default="{}")
    parser.add_argument("--cache", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = f"device {args.shard}"

    def log(message: str) -> None:
        print(f"{name}: {message}", flush=True)

    try:
        train_x, train_y = read_split(args.data_dir, "train")
        keep, shards = train_shards(
            train_y,
            args.clients,
            Split(args.split),
            10,
            args.seed,
            train_examples=args.train_examples,
        )
        if not 0 <= args.shard < args.clients:
            raise HeteroFLError(f"shard {args.shard} is outside 0..{args.clients - 1}")
        indices = keep[shards.indices[args.shard]]
        capabilities = Capabilities.from_json(json.loads(args.capabilities))
        client = CoordinatorClient(
            args.coordinator, args.cache, bandwidth_mbps=capabilities.bandwidth_mbps
        )
        device = Device(
            client,
            train_x[indices],
            train_y[indices],
            capabilities,
            seed=args.seed + args.shard,
            log=log,
        )
        device.register()
        device.run()
        log(f"bytes sent {client.bytes_sent}, received {client.bytes_received}")
        return 0
    except TokenRefused as exc:
        log(f"token refused ({exc.message}); exiting")
        return 4
    except (ProtocolError, HeteroFLError) as exc:
        log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
