"""Running ``heterofl-edge coordinator serve`` as a child process (demo, tests, benchmarks)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from heterofl_edge.errors import HeteroFLError

__all__ = ["free_port", "start_coordinator", "stop", "wait_until_ready"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_coordinator(
    args: list[str],
    log_path: Path,
    timeout: float = 120.0,
    attempts: int = 3,
    port: int | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``heterofl-edge coordinator serve`` with ``args``; wait until it answers.

    The port is ``port`` (a restart on the same address), else a free one on
    127.0.0.1; if another process takes a free one between the check and the
    bind (parallel test workers), a new port is tried.
    """
    fixed = port
    for attempt in range(attempts if fixed is None else 1):
        port = free_port() if fixed is None else fixed
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "heterofl_edge",
                    "coordinator",
                    "serve",
                    "--port",
                    str(port),
                    *args,
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{url}/v1/health", timeout=2).ok:
                    return process, url
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                log = log_path.read_text(errors="replace")
                if "Address already in use" in log and attempt + 1 < attempts:
                    break
                raise HeteroFLError(f"the coordinator did not start: {log[-1000:]}")
            time.sleep(0.2)
    raise HeteroFLError("the coordinator did not start: no free port")


def stop(process: subprocess.Popen[bytes], grace_seconds: float = 60.0) -> None:
    """Ask the coordinator to stop (SIGTERM; idle, it stops in under a second), else kill it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_ready(url: str, timeout: float = 900.0) -> None:
    """Wait until the coordinator has built every level's artifacts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if requests.get(f"{url}/v1/health", timeout=30).json().get("artifacts_ready"):
            return
        time.sleep(1.0)
    raise HeteroFLError(f"the coordinator did not build its artifacts within {timeout:.0f} s")
