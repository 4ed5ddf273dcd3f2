"""Each level's exported programs, built off the request path and served once ready.

The coordinator's worker exports every level in play at start-up (smallest
first, so that devices can profile themselves on it early) and before any
round opens; a request for a level that is not built yet gets 503
``not_ready``. An anonymous request can therefore never start an export.

Exports run in one child process (spawned, so it shares nothing with the
request threads): the coordinator stays responsive while torch exports, and a
stop (SIGTERM, Ctrl-C) ends the child at once instead of waiting for a
minutes-long export or abandoning native work at interpreter exit. A level
already in the state folder is used only after every file it lists matches
its size and sha256; a damaged one is moved aside (never deleted) and
exported again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.levels import parse_rate, rate_label
from heterofl_edge.models import Architecture

if TYPE_CHECKING:
    from exporter.config import ExportConfig

__all__ = ["Artifacts", "ExportStopped", "damage_in"]

log = logging.getLogger("heterofl_edge.coordinator")


class ExportStopped(Exception):
    """The coordinator is stopping: the export child was ended, nothing half-written kept."""


class Artifacts:
    def __init__(
        self,
        config: CoordinatorConfig,
        arch: Architecture,
        rates: Sequence[float],
        global_rate: float,
    ) -> None:
        self.config = config
        self.arch = arch
        self.rates = tuple(sorted(rates))
        self.global_rate = global_rate
        self.root = config.state_dir / "artifacts"
        self._ready: set[float] = set()
        self._lock = threading.Lock()

    def folder(self, rate: float) -> Path:
        from exporter.pipeline import level_folder_name

        return self.root / level_folder_name(self.arch.name, rate)

    def all_ready(self) -> bool:
        return self._ready >= set(self.rates)

    def ready_levels(self) -> list[str]:
        return [rate_label(r) for r in self.rates if r in self._ready]

    def build_all(
        self,
        stopping: Callable[[], bool] = lambda: False,
        log_line: Callable[[str], None] = log.info,
    ) -> None:
        """Export (or find, checked) every level in play, smallest first.

        ``ExportStopped`` when ``stopping()`` turns true meanwhile; a failed export
        raises its ``HeteroFLError`` (the user's settings) or ``RuntimeError``.
        """
        with self._lock:
            self._remove_staging()
            missing = [rate for rate in self.rates if not self._usable(rate, log_line)]
            if missing:
                self._export(missing, stopping, log_line)

    def _usable(self, rate: float, log_line: Callable[[str], None]) -> bool:
        if rate in self._ready:
            return True
        folder = self.folder(rate)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return False
        wanted = set(self.config.artifact_formats)
        problem = damage_in(folder)
        if problem is None and wanted <= _formats_in(manifest):
            self._ready.add(rate)
            return True
        if problem is not None:
            aside = _move_aside(folder, self.root / "damaged")
            log.warning(
                "level %s artifacts are damaged (%s); moved to %s and exported again",
                rate_label(rate),
                problem,
                aside,
            )
        return False

    def _export(
        self,
        rates: Sequence[float],
        stopping: Callable[[], bool],
        log_line: Callable[[str], None],
    ) -> None:
        configs = [self._export_config(rate) for rate in rates]
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(
            target=_export_levels,
            args=(configs, self.root, sender),
            name="heterofl-export",
            daemon=True,
        )
        child.start()
        sender.close()
        pending = list(rates)
        try:
            while pending:
                if stopping():
                    raise ExportStopped("the coordinator is stopping")
                ready = wait([receiver, child.sentinel], timeout=0.25)
                if receiver in ready:
                    try:
                        message = receiver.recv()
                    except EOFError:
                        message = None
                    if message is not None:
                        self._handle(message, pending, log_line)
                        continue
                if child.sentinel in ready or not child.is_alive():
                    if stopping():
                        raise ExportStopped("the coordinator is stopping")
                    raise RuntimeError(
                        f"the export process ended (exit code {child.exitcode}) before "
                        f"level {rate_label(pending[0])} was written"
                    )
        finally:
            if child.is_alive():
                child.terminate()
            child.join()
            receiver.close()
            self._remove_staging()

    def _handle(
        self, message: tuple[Any, ...], pending: list[float], say: Callable[[str], None]
    ) -> None:
        kind, rate = message[0], message[1]
        if kind == "start":
            formats = ", ".join(self.config.artifact_formats)
            say(f"exporting level {rate_label(rate)} ({formats})")
        elif kind == "done":
            self._ready.add(rate)
            pending.remove(rate)
        elif kind == "refused":
            raise HeteroFLError(message[2], message[3])
        else:
            raise RuntimeError(f"exporting level {rate_label(rate)} failed: {message[2]}")

    def _export_config(self, rate: float) -> ExportConfig:
        from exporter.config import ExportConfig, Format
        from exporter.step import OptimizerSettings

        local = self.config.local_training
        return ExportConfig(
            model=self.arch.name,
            rate=rate,
            global_rate=self.global_rate,
            formats=tuple(Format(f) for f in self.config.artifact_formats),
            batch_size=local.batch_size,
            verify=self.config.artifact_verify,
            optimizer=OptimizerSettings(local.momentum, local.weight_decay, local.clip_grad_norm),
        )

    def _remove_staging(self) -> None:
        """Staging folders an ended export left (``export_level`` names them ``.NAME.*``)."""
        if not self.root.is_dir():
            return
        for rate in self.rates:
            for stale in self.root.glob(f".{self.folder(rate).name}.*"):
                shutil.rmtree(stale, ignore_errors=True)

    def locate(self, model: str, level: str) -> tuple[Path, dict[str, Any]]:
        """A built level's folder and manifest; 404 or 503 otherwise."""
        if model != self.arch.name:
            raise ApiError(
                ErrorCode.not_found, f"this coordinator serves {self.arch.name}, not {model!r}"
            )
        try:
            rate = parse_rate(level)
        except Exception:
            raise ApiError(ErrorCode.not_found, f"unknown level {level!r}") from None
        if rate not in self.rates:
            raise ApiError(
                ErrorCode.not_found,
                f"level {level} is not in play",
                f"levels: {', '.join(rate_label(r) for r in self.rates)}",
            )
        if rate not in self._ready:
            raise ApiError(
                ErrorCode.not_ready,
                f"level {level} artifacts are still being built",
                "retry in a few seconds",
            )
        folder = self.folder(rate)
        return folder, json.loads((folder / "manifest.json").read_text())


def _export_levels(configs: Sequence[ExportConfig], root: Path, report: Connection) -> None:
    """The export child: each level in turn, reported as started and done (or refused).

    It ends itself as soon as the coordinator is gone (killed with SIGKILL, say), so
    that no orphan keeps writing into a state folder a restarted coordinator uses.
    """
    import torch

    from exporter.pipeline import export_level

    parent = multiprocessing.parent_process()
    if parent is not None:

        def end_with_parent() -> None:
            wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=end_with_parent, name="parent-watch", daemon=True).start()

    torch.set_num_threads(1)  # the coordinator's cores serve requests meanwhile
    for config in configs:
        report.send(("start", config.rate))
        try:
            export_level(config, root)
        except HeteroFLError as exc:
            report.send(("refused", config.rate, exc.message, exc.hint))
            return
        except Exception as exc:
            report.send(("fault", config.rate, f"{type(exc).__name__}: {exc}"))
            return
        report.send(("done", config.rate))


def damage_in(folder: Path) -> str | None:
    """What is wrong with an exported level's files, or None when each matches its manifest."""
    try:
        files = json.loads((folder / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"manifest.json cannot be read ({type(exc).__name__})"
    for name, meta in files.items():
        path = folder / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != meta.get("bytes"):
            return f"{name} has {size} bytes, its manifest says {meta.get('bytes')}"
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != meta.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _move_aside(folder: Path, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    target = into / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = into / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{suffix}"
    folder.rename(target)
    return target


def _formats_in(manifest: Path) -> set[str]:
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return set()
    return {name.split("/", 1)[0] for name in files if "/" in name}
