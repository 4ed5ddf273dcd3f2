"""A round engine journal in a folder: what ``simulate --resume`` continues from.

``FileJournal`` implements ``heterofl_edge.engine.Journal`` with two kinds of
files, each written atomically (a temporary file, fsync, rename):

* ``model-RRRRRR-STAGE.safetensors``: the global model after round R's
  aggregation (``aggregated``) or after the whole round (``final``); tensors
  only, in a format that cannot run code;
* ``journal.json``: the run's fingerprint (the settings its results depend
  on), the initial evaluation, every finished round's result, the open round
  (its tasks, learning rate and phase) and the name of the checkpoint to
  resume from.

The model file is written before the ``journal.json`` that names it, so a
kill at any moment leaves a journal that points at a complete checkpoint;
older model files are removed afterwards. A run's randomness comes from its
seed and the round number alone (selection, levels, batch order, the
learning-rate schedule), so resuming from a checkpoint repeats, bit for bit,
what the killed run would have done.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from heterofl_edge.engine import Phase, ResumePoint, RoundOpen, RoundResult, Task
from heterofl_edge.errors import ConfigError, DataError
from heterofl_edge.report import atomic_write_bytes

__all__ = ["FileJournal"]

FORMAT = 1
State = dict[str, torch.Tensor]


class FileJournal:
    """Checkpoints of one run in ``folder``; ``fingerprint`` must match to resume."""

    def __init__(self, folder: Path, fingerprint: Mapping[str, Any], resume: bool) -> None:
        self.folder = folder
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self._path = folder / "journal.json"
        if self._path.exists() and not resume:
            raise ConfigError(
                f"{folder} holds a run already",
                "pass --resume to continue it, or choose another --out",
            )
        self._data: dict[str, Any] = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "initial": None,
            "completed": 0,
            "checkpoint": None,
            "open_round": None,
            "results": [],
        }
        if self._path.exists():
            self._data = self._read()

    # -- what a resumed run needs ------------------------------------------------
    @property
    def started(self) -> bool:
        """True once the initial model and its evaluation are recorded."""
        return self._data["checkpoint"] is not None

    @property
    def initial(self) -> Mapping[str, float | None]:
        return dict(self._data["initial"] or {})

    @property
    def results(self) -> list[RoundResult]:
        return [_result(r) for r in self._data["results"]]

    def start(self, state: State, initial: Mapping[str, float | None]) -> None:
        """Record the initial model (round 0, with its statistics) and its evaluation."""
        self._data["initial"] = dict(initial)
        self._checkpoint(0, "final", state)

    # -- the engine's Journal ----------------------------------------------------
    def resume(self) -> ResumePoint | None:
        if not self.started:
            return None
        state = self._load(self._data["checkpoint"])
        opened = self._data["open_round"]
        history = tuple(r["privacy"] for r in self._data["results"] if r.get("privacy"))
        return ResumePoint(
            int(self._data["completed"]),
            state,
            None if opened is None else _open(opened),
            history,
        )

    def round_opened(self, opened: RoundOpen) -> None:
        self._data["open_round"] = _open_json(opened)
        self._write()

    def training_closed(self, opened: RoundOpen, state: State) -> None:
        self._data["open_round"] = _open_json(opened)
        self._checkpoint(opened.round, "aggregated", state)

    def round_finished(self, result: RoundResult, state: State) -> None:
        self._data["results"].append(result.to_json())
        self._data["completed"] = result.round
        self._data["open_round"] = None
        self._checkpoint(result.round, "final", state)

    # -- files --------------------------------------------------------------------
    def _checkpoint(self, round_number: int, stage: str, state: State) -> None:
        name = f"model-{round_number:06d}-{stage}.safetensors"
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write_bytes(self.folder / name, save(tensors))
        self._data["checkpoint"] = name
        self._write()
        for old in self.folder.glob("model-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _write(self) -> None:
        payload = json.dumps(self._data, indent=1, allow_nan=False) + "\n"
        atomic_write_bytes(self._path, payload.encode())

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self._path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read the journal {self._path}: {exc}", "start the run in a new --out"
            ) from None
        if data.get("format") != FORMAT:
            raise ConfigError(
                f"{self._path} has journal format {data.get('format')}, this build reads {FORMAT}",
                "start the run in a new --out",
            )
        if data.get("fingerprint") != self.fingerprint:
            theirs, ours = data.get("fingerprint") or {}, self.fingerprint
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ConfigError(
                f"{self.folder} holds a run with other settings ({', '.join(differ)})",
                "resume with the settings it was started with, or choose another --out",
            )
        return data

    def _load(self, name: str) -> State:
        try:
            return load((self.folder / name).read_bytes())
        except (OSError, SafetensorError) as exc:
            raise DataError(
                f"cannot read the checkpoint {self.folder / name}: {exc}",
                "start the run in a new --out",
            ) from None


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _open_json(opened: RoundOpen) -> dict[str, Any]:
    return {
        "round": opened.round,
        "phase": opened.phase.value,
        "lr": opened.lr,
        "tasks": [asdict(t) for t in opened.tasks],
        "opened_at": opened.opened_at,
        "deadline": _finite_or_none(opened.deadline),
        "stats_tasks": [asdict(t) for t in opened.stats_tasks],
        "stats_deadline": _finite_or_none(opened.stats_deadline),
        "summary": dict(opened.summary),
    }


def _open(data: Mapping[str, Any]) -> RoundOpen:
    deadline = data["deadline"]
    stats_deadline = data["stats_deadline"]
    return RoundOpen(
        round=int(data["round"]),
        phase=Phase(data["phase"]),
        lr=float(data["lr"]),
        tasks=tuple(Task(**t) for t in data["tasks"]),
        opened_at=float(data["opened_at"]),
        deadline=math.inf if deadline is None else float(deadline),
        stats_tasks=tuple(Task(**t) for t in data["stats_tasks"]),
        stats_deadline=math.inf if stats_deadline is None else float(stats_deadline),
        summary=dict(data["summary"]),
    )


def _result(data: Mapping[str, Any]) -> RoundResult:
    return RoundResult(**data)
