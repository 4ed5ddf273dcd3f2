"""Persistent coordinator state: SQLite for records, safetensors files for tensors.

Layout of the state folder::

    coordinator.sqlite3            devices (hashed tokens), rounds, assignments
    checkpoints/global-000N.safetensors   the global model after N rounds
    rounds/000N/updates/DEVICE.safetensors  accepted uploads of round N
    rounds/000N/statistics/DEVICE.safetensors
    artifacts/                     exported programs, cached

Every file is written to a temporary name and renamed; a record that points
at a file is committed only after the file is in place, so nothing accepted
is lost by a crash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.wire import decode, encode
from heterofl_edge.report import atomic_write_bytes

__all__ = ["Assignment", "Device", "RoundRecord", "Store", "hash_token"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, token_sha256 TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL, rate REAL NOT NULL, registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    number INTEGER PRIMARY KEY, state TEXT NOT NULL, lr REAL NOT NULL, opened_at REAL NOT NULL,
    deadline REAL NOT NULL, stats_deadline REAL, finished_at REAL, metrics TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    round INTEGER NOT NULL, device_id TEXT NOT NULL, rate REAL NOT NULL, status TEXT NOT NULL,
    num_samples INTEGER, labels TEXT, metrics TEXT, stats_status TEXT NOT NULL DEFAULT 'none',
    PRIMARY KEY (round, device_id)
);
"""


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    """Serialise a method on the store's lock: one SQLite connection serves every thread."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Device:
    id: str
    position: int
    profile: dict[str, Any]
    rate: float


@dataclass(frozen=True)
class RoundRecord:
    number: int
    state: str  # training | statistics | finished | failed
    lr: float
    opened_at: float
    deadline: float
    stats_deadline: float | None
    finished_at: float | None
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Assignment:
    round: int
    device_id: str
    rate: float
    status: str  # assigned | uploaded | timed_out
    num_samples: int | None
    labels: list[int] | None
    metrics: dict[str, Any] | None
    stats_status: str  # none | asked | uploaded


class Store:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.RLock()
        folder.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(folder / "coordinator.sqlite3", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._db.commit()

    @_locked
    def close(self) -> None:
        self._db.close()

    # -- meta ---------------------------------------------------------------
    @_locked
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self._db.commit()

    # -- devices ------------------------------------------------------------
    @_locked
    def add_device(
        self, device_id: str, token: str, profile: dict[str, Any], rate: float, now: float
    ) -> Device:
        position = self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
        self._db.execute(
            "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
            (device_id, position, hash_token(token), json.dumps(profile), rate, now),
        )
        self._db.commit()
        return Device(device_id, position, profile, rate)

    @_locked
    def device_by_token(self, token: str) -> Device | None:
        row = self._db.execute(
            "SELECT * FROM devices WHERE token_sha256 = ?", (hash_token(token),)
        ).fetchone()
        return None if row is None else _device(row)

    @_locked
    def devices(self) -> list[Device]:
        return [_device(r) for r in self._db.execute("SELECT * FROM devices ORDER BY position")]

    # -- rounds -------------------------------------------------------------
    @_locked
    def add_round(self, record: RoundRecord, assignments: list[tuple[str, float]]) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.number,
                    record.state,
                    record.lr,
                    record.opened_at,
                    record.deadline,
                    record.stats_deadline,
                    record.finished_at,
                    json.dumps(record.metrics),
                ),
            )
            self._db.executemany(
                "INSERT INTO assignments (round, device_id, rate, status) "
                "VALUES (?, ?, ?, 'assigned')",
                [(record.number, d, r) for d, r in assignments],
            )

    @_locked
    def update_round(self, number: int, **fields: Any) -> None:
        if "metrics" in fields:
            fields["metrics"] = json.dumps(fields["metrics"])
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._db:
            self._db.execute(
                f"UPDATE rounds SET {columns} WHERE number = ?", (*fields.values(), number)
            )

    @_locked
    def rounds(self) -> list[RoundRecord]:
        return [_round(r) for r in self._db.execute("SELECT * FROM rounds ORDER BY number")]

    @_locked
    def round(self, number: int) -> RoundRecord | None:
        row = self._db.execute("SELECT * FROM rounds WHERE number = ?", (number,)).fetchone()
        return None if row is None else _round(row)

    # -- assignments --------------------------------------------------------
    @_locked
    def assignments(self, number: int) -> list[Assignment]:
        rows = self._db.execute(
            "SELECT * FROM assignments WHERE round = ? ORDER BY device_id", (number,)
        )
        return [_assignment(r) for r in rows]

    @_locked
    def assignment(self, number: int, device_id: str) -> Assignment | None:
        row = self._db.execute(
            "SELECT * FROM assignments WHERE round = ? AND device_id = ?", (number, device_id)
        ).fetchone()
        return None if row is None else _assignment(row)

    @_locked
    def set_assignment(self, number: int, device_id: str, **fields: Any) -> None:
        for key in ("labels", "metrics"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        columns = ", ".join(f"{k} = ?" for k in fields)
        with self._db:
            self._db.execute(
                f"UPDATE assignments SET {columns} WHERE round = ? AND device_id = ?",
                (*fields.values(), number, device_id),
            )

    # -- tensors ------------------------------------------------------------
    def _round_dir(self, number: int, kind: str) -> Path:
        return self.folder / "rounds" / f"{number:04d}" / kind

    def save_upload(self, number: int, kind: str, device_id: str, payload: bytes) -> None:
        atomic_write_bytes(self._round_dir(number, kind) / f"{device_id}.safetensors", payload)

    def load_upload(
        self, number: int, kind: str, device_id: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return decode((self._round_dir(number, kind) / f"{device_id}.safetensors").read_bytes())

    def save_checkpoint(self, completed_rounds: int, state: dict[str, torch.Tensor]) -> None:
        path = self.folder / "checkpoints" / f"global-{completed_rounds:04d}.safetensors"
        atomic_write_bytes(path, encode(state, {"completed_rounds": str(completed_rounds)}))
        self.set_meta("checkpoint", str(completed_rounds))

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        completed = self.get_meta("checkpoint")
        if completed is None:
            return None
        path = self.folder / "checkpoints" / f"global-{int(completed):04d}.safetensors"
        return int(completed), decode(path.read_bytes())[0]


def _device(row: sqlite3.Row) -> Device:
    return Device(row["id"], row["position"], json.loads(row["profile"]), row["rate"])


def _round(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(
        row["number"],
        row["state"],
        row["lr"],
        row["opened_at"],
        row["deadline"],
        row["stats_deadline"],
        row["finished_at"],
        json.loads(row["metrics"]),
    )


def _assignment(row: sqlite3.Row) -> Assignment:
    return Assignment(
        row["round"],
        row["device_id"],
        row["rate"],
        row["status"],
        row["num_samples"],
        None if row["labels"] is None else json.loads(row["labels"]),
        None if row["metrics"] is None else json.loads(row["metrics"]),
        row["stats_status"],
    )
