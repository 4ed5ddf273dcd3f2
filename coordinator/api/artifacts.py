"""Artifacts by level and format, exported on first request and cached."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, send_file

from coordinator.api.common import service
from coordinator.errors import NotFound
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.levels import parse_rate

bp = Blueprint("artifacts", __name__)
_export_lock = threading.Lock()


def _level_folder(model: str, level: str) -> tuple[Path, dict[str, Any]]:
    from exporter.config import ExportConfig, Format
    from exporter.pipeline import export_level, level_folder_name

    coordinator = service()
    if model != coordinator.arch.name:
        raise NotFound(f"this coordinator serves {coordinator.arch.name}, not {model!r}")
    try:
        rate = parse_rate(level)
    except HeteroFLError:
        raise NotFound(f"unknown level {level!r}") from None
    if rate not in coordinator.mix.rates:
        raise NotFound(f"level {level} is not in play", f"levels: {coordinator.mix.name}")
    root = coordinator.artifact_dir()
    folder = root / level_folder_name(model, rate)
    with _export_lock:
        if not (folder / "manifest.json").is_file():
            config = coordinator.config
            export_level(
                ExportConfig(
                    model=model,
                    rate=rate,
                    global_rate=coordinator.mix.global_rate,
                    formats=tuple(Format(f) for f in config.artifact_formats),
                    batch_size=config.local.batch_size,
                    verify=config.artifact_verify,
                    optimizer=_optimizer(config),
                ),
                root,
            )
    return folder, json.loads((folder / "manifest.json").read_text())


def _optimizer(config: Any) -> Any:
    from exporter.step import OptimizerSettings

    local = config.local
    return OptimizerSettings(local.momentum, local.weight_decay, local.clip_grad_norm)


@bp.get("/v1/artifacts/<model>/<level>/manifest.json")
def manifest(model: str, level: str) -> Response:
    folder, _ = _level_folder(model, level)
    return send_file(folder / "manifest.json", mimetype="application/json")


@bp.get("/v1/artifacts/<model>/<level>/<fmt>/<name>")
def artifact(model: str, level: str, fmt: str, name: str) -> Response:
    folder, meta = _level_folder(model, level)
    relative = f"{fmt}/{name}"
    if relative not in meta["files"]:  # only files the manifest lists: no path tricks
        raise NotFound(f"no artifact {relative} for {model} level {level}")
    response = send_file(folder / relative, mimetype="application/octet-stream")
    response.headers["X-Content-SHA256"] = meta["files"][relative]["sha256"]
    return response
