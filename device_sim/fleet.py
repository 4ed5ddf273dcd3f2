"""A fleet of simulated devices, each its own process, against one coordinator.

Devices start one after another and register in shard order (device i holds
shard i of the run's split), then work concurrently. The fleet shows rounds
as the coordinator reports them, and stops every process it started.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from device_sim.device import Capabilities
from device_sim.protocol import DEFAULT_UNREACHABLE_SECONDS
from heterofl_edge.errors import HeteroFLError

__all__ = ["DEFAULT_PROFILES", "Fleet", "FleetConfig", "describe_round", "load_profiles"]

# Fast, medium and slow devices (CPU slowdown, link speed), used round-robin.
DEFAULT_PROFILES = (
    Capabilities(cpu_slowdown=1.0, bandwidth_mbps=None, memory_mb=4096),
    Capabilities(cpu_slowdown=3.0, bandwidth_mbps=50.0, memory_mb=1024),
    Capabilities(cpu_slowdown=10.0, bandwidth_mbps=10.0, memory_mb=256),
)


def load_profiles(path: Path | None) -> list[Capabilities]:
    if path is None:
        return list(DEFAULT_PROFILES)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HeteroFLError(
            f"cannot read profiles {path}: {exc}", "give a JSON list of objects"
        ) from None
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise HeteroFLError(
            f"profiles {path} must be a non-empty JSON list of objects",
            'e.g. [{"cpu_slowdown": 1}, {"cpu_slowdown": 4, "bandwidth_mbps": 20, "dropout": 0.1}]',
        )
    return [Capabilities.from_json(d) for d in data]


@dataclass
class FleetConfig:
    coordinator: str
    data_dir: Path
    clients: int
    split: str = "iid"
    seed: int = 0
    train_examples: int | None = None
    profiles: Sequence[Capabilities] = field(default_factory=lambda: list(DEFAULT_PROFILES))
    work_dir: Path = Path("runs/fleet")
    shards: Sequence[int] | None = None  # which of the `clients` shards to run (default: all)
    # More 'heterofl-edge device' options for every device, e.g. ("--data", "imagefolder").
    device_options: Sequence[str] = ()
    enrollment_token: str | None = None  # passed to the devices (in their environment)
    operator_token: str | None = None  # to read the round history, where it is protected
    ca_cert: Path | None = None  # an HTTPS coordinator's self-signed certificate
    # How long the fleet and each device ride out an unreachable coordinator (a restart).
    unreachable_seconds: float = DEFAULT_UNREACHABLE_SECONDS


class Fleet:
    def __init__(self, config: FleetConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.device_ids: list[str] = []  # as registered, in shard order

    def start(self, register_timeout: float = 300.0) -> None:
        """Start every device, each registered before the next starts."""
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.config.enrollment_token:  # in the environment: command lines are public
            env["HETEROFL_ENROLLMENT_TOKEN"] = self.config.enrollment_token
        shards = self.config.shards
        for shard in range(self.config.clients) if shards is None else shards:
            capabilities = self.config.profiles[shard % len(self.config.profiles)]
            log_path = self.config.work_dir / f"device-{shard}.log"
            command = [
                sys.executable,
                "-m",
                "heterofl_edge",
                "device",
                "--coordinator",
                self.config.coordinator,
                "--data-dir",
                str(self.config.data_dir),
                "--shard",
                str(shard),
                "--clients",
                str(self.config.clients),
                "--split",
                self.config.split,
                "--seed",
                str(self.config.seed),
                "--capabilities",
                json.dumps(asdict(capabilities)),
                "--cache",
                str(self.config.work_dir / "cache" / f"device-{shard}"),
            ]
            if self.config.train_examples is not None:
                command += ["--train-examples", str(self.config.train_examples)]
            if self.config.ca_cert is not None:
                command += ["--ca-cert", str(self.config.ca_cert)]
            command += ["--unreachable-timeout", str(self.config.unreachable_seconds)]
            command += list(self.config.device_options)
            with log_path.open("wb") as sink:
                process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
            self.processes.append(process)
            self.logs.append(log_path)
            line = self._wait_for(log_path, "registered as ", process, register_timeout)
            self.device_ids.append(line.split("registered as ", 1)[1].split()[0])
            self.log(f"device {shard} {line.split(': ', 1)[-1]} ({_describe(capabilities)})")

    def _wait_for(
        self, path: Path, text: str, process: subprocess.Popen[bytes], timeout: float
    ) -> str:
        """The first log line holding ``text``, once the device has written it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
            if process.poll() is not None:
                raise HeteroFLError(f"a device exited while starting: {path.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise HeteroFLError(f"a device did not register within {timeout:.0f} s; see {path}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        self.processes[index].kill()

    def running(self) -> int:
        return sum(1 for p in self.processes if p.poll() is None)

    def follow(
        self,
        on_round: Callable[[dict[str, Any]], None],
        timeout: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> list[dict[str, Any]]:
        """Report each finished round until the coordinator has run them all.

        A coordinator that stops answering (a restart) is waited for with
        back-off, for ``unreachable_seconds`` at most: then ``HeteroFLError``.
        """
        reported: set[int] = set()
        deadline = time.monotonic() + timeout
        base = self.config.coordinator.rstrip("/")
        session = requests.Session()
        if self.config.operator_token:
            session.headers["Authorization"] = f"Bearer {self.config.operator_token}"
        if self.config.ca_cert is not None:
            session.verify = str(self.config.ca_cert)
        lost_since: float | None = None
        delay = 0.5
        while time.monotonic() < deadline:
            try:
                health = _json(session.get(f"{base}/v1/health", timeout=30))
                rounds = _json(session.get(f"{base}/v1/rounds", timeout=30))["rounds"]
            except (requests.ConnectionError, requests.Timeout, _Unavailable) as exc:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    self.log(f"coordinator unreachable ({_reason(exc)}); waiting for it")
                if now - lost_since > self.config.unreachable_seconds:
                    raise HeteroFLError(
                        f"the coordinator at {base} has been unreachable for "
                        f"{now - lost_since:.0f} s ({_reason(exc)}); giving up",
                        "restart it on the same --state-dir, then run the fleet again "
                        "(--unreachable-timeout sets how long to wait)",
                    ) from None
                sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if lost_since is not None:
                self.log(f"coordinator back after {time.monotonic() - lost_since:.0f} s")
                lost_since, delay = None, 0.5
            for record in rounds:
                if record["state"] in ("finished", "failed") and record["round"] not in reported:
                    reported.add(record["round"])
                    on_round(record)
            if health.get("done"):
                self._let_devices_finish(grace_seconds=30.0)
                return rounds
            if self.running() == 0 and self.processes:
                return rounds
            sleep(0.5)
        raise HeteroFLError(f"the fleet did not finish within {timeout:.0f} s")

    def _let_devices_finish(self, grace_seconds: float) -> None:
        """Give running devices time to poll once more, hear 'done' and exit on their own."""
        deadline = time.monotonic() + grace_seconds
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class _Unavailable(Exception):
    """A reply that says the coordinator cannot answer now (5xx): wait as for a restart."""


def _json(reply: requests.Response) -> Any:
    """The reply's JSON; ``_Unavailable`` for a 5xx, ``HeteroFLError`` for a refusal."""
    if reply.status_code >= 500:
        raise _Unavailable(f"HTTP {reply.status_code}")
    if reply.status_code >= 400:
        try:
            body = reply.json()
        except ValueError:
            body = {}
        raise HeteroFLError(
            f"the coordinator refused {reply.request.path_url}: HTTP {reply.status_code} "
            f"{body.get('code', '')} {body.get('message', '')}".rstrip(),
            str(body.get("hint") or "check the fleet's options (e.g. --operator-token)"),
        )
    return reply.json()


def _reason(error: Exception) -> str:
    text = str(error)
    return "connection refused" if "refused" in text.lower() else text[:120]


def describe_round(record: dict[str, Any], names: Mapping[str, str] | None = None) -> str:
    """One line per round: accuracy, per-level losses, and each device's level."""
    result = record["metrics"]
    per_level: dict[str, list[float]] = {}
    for a in record["assignments"]:
        if a["status"] == "uploaded":
            per_level.setdefault(a["level"], []).append(
                (a.get("metrics") or {}).get("loss", math.nan)
            )
    levels = "  ".join(
        f"{level}: {len(losses)} trained, loss {sum(losses) / len(losses):.3f}"
        for level, losses in sorted(per_level.items())
    )
    accuracy = (result.get("evaluation") or {}).get("global_accuracy")
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    timed_out = result.get("timed_out", 0)
    line = f"round {record['round']} {record['state']}: global accuracy {shown}  |  {levels}"
    if timed_out:
        line += f"  |  {timed_out} missed the deadline"
    if names:
        placed = sorted(
            (names.get(a["device_id"], a["device_id"]), a["level"]) for a in record["assignments"]
        )
        line += "\n    levels: " + ", ".join(f"{name} {level}" for name, level in placed)
    return line


def _describe(c: Capabilities) -> str:
    link = "no link cap" if c.bandwidth_mbps is None else f"{c.bandwidth_mbps:g} Mbit/s"
    return f"{c.cpu_slowdown:g}x slower CPU, {link}, {c.memory_mb:g} MB" + (
        f", drops out {c.dropout:.0%}" if c.dropout else ""
    )
