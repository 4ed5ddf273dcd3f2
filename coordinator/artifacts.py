"""Each level's exported programs, built off the request path and served once ready.

The coordinator's worker exports every level in play at start-up (smallest
first, so that devices can profile themselves on it early) and before any
round opens; a request for a level that is not built yet gets 503
``not_ready``. An anonymous request can therefore never start an export.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.levels import parse_rate, rate_label
from heterofl_edge.models import Architecture

__all__ = ["Artifacts"]

log = logging.getLogger("heterofl_edge.coordinator")


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

    def build_all(self, log_line: Callable[[str], None] = log.info) -> None:
        """Export (or find) every level in play, smallest first."""
        for rate in self.rates:
            self.build(rate, log_line)

    def build(self, rate: float, log_line: Callable[[str], None] = log.info) -> None:
        from exporter.config import ExportConfig, Format
        from exporter.pipeline import export_level
        from exporter.step import OptimizerSettings

        with self._lock:
            if rate in self._ready:
                return
            folder = self.folder(rate)
            manifest = folder / "manifest.json"
            wanted = set(self.config.artifact_formats)
            if manifest.is_file() and wanted <= _formats_in(manifest):
                self._ready.add(rate)
                return
            log_line(f"exporting level {rate_label(rate)} ({', '.join(sorted(wanted))})")
            local = self.config.local
            export_level(
                ExportConfig(
                    model=self.arch.name,
                    rate=rate,
                    global_rate=self.global_rate,
                    formats=tuple(Format(f) for f in self.config.artifact_formats),
                    batch_size=local.batch_size,
                    verify=self.config.artifact_verify,
                    optimizer=OptimizerSettings(
                        local.momentum, local.weight_decay, local.clip_grad_norm
                    ),
                ),
                self.root,
            )
            self._ready.add(rate)

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


def _formats_in(manifest: Path) -> set[str]:
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return set()
    return {name.split("/", 1)[0] for name in files if "/" in name}
