"""Persistent coordinator state: SQLite (WAL, group commit) and checkpoint files.

Layout of the state folder::

    coordinator.sqlite3     devices (hashed tokens), rounds, tasks with accepted payloads
    checkpoints/round-000N-STAGE.safetensors   the global model after round N's STAGE
    artifacts/              exported programs

Durability: an upload is acknowledged only after the transaction that holds
its bytes and its record has committed with ``synchronous=FULL``, so a 2xx
survives ``kill -9`` and power loss. Writes from every thread go to one
writer thread that commits whatever is queued as one transaction (group
commit): one fsync serves many uploads. Each job runs inside its own
savepoint, so one failing job leaves the others and the state untouched.
Readers use their own connections (WAL: they never wait for the writer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from heterofl_edge.engine import Phase, RoundOpen, Task
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.report import atomic_write_bytes

__all__ = [
    "SCHEMA_VERSION",
    "Checkpoint",
    "DeviceRow",
    "StateError",
    "Store",
    "TaskRow",
    "hash_token",
]

log = logging.getLogger("heterofl_edge.coordinator")

SCHEMA_VERSION = 2
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    profile TEXT NOT NULL, rate REAL NOT NULL, registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    number INTEGER PRIMARY KEY, state TEXT NOT NULL, lr REAL NOT NULL, opened_at REAL NOT NULL,
    deadline REAL NOT NULL, stats_deadline REAL, summary TEXT, result TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    round INTEGER NOT NULL, phase TEXT NOT NULL, device_id TEXT NOT NULL,
    position INTEGER NOT NULL, rate REAL NOT NULL, lr REAL NOT NULL, seed INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'assigned', received_at REAL, seconds REAL,
    num_samples INTEGER, labels TEXT, metrics TEXT, payload BLOB, sha256 TEXT, size INTEGER,
    PRIMARY KEY (round, phase, device_id)
);
"""


class StateError(HeteroFLError):
    """A state folder that cannot be used as it is (another run, older format, damage)."""

    code = "bad_state"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class DeviceRow:
    id: str
    position: int
    token_sha256: str
    profile: dict[str, Any]
    rate: float
    registered_at: float


@dataclass(frozen=True)
class TaskRow:
    round: int
    phase: Phase
    device_id: str
    position: int
    rate: float
    lr: float
    seed: int
    status: str  # assigned | uploaded | missed
    received_at: float | None
    seconds: float | None
    num_samples: int | None
    labels: tuple[int, ...] | None
    metrics: dict[str, float] | None


@dataclass(frozen=True)
class Checkpoint:
    completed_rounds: int
    stage: str  # final (after round `completed_rounds`) | aggregated (of the next round)
    file: str


class _Job:
    __slots__ = ("function", "future")

    def __init__(self, function: Callable[[sqlite3.Connection], Any]) -> None:
        self.function = function
        self.future: Future[Any] = Future()


class _GroupCommitWriter:
    """One thread, one connection: queued jobs commit together, each in its own savepoint."""

    def __init__(self, path: Path, max_batch: int = 256) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.batches = 0
        self.jobs = 0
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    def submit(self, function: Callable[[sqlite3.Connection], T]) -> T:
        job = _Job(function)
        self._queue.put(job)
        result: T = job.future.result()
        return result

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._db.close()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for job in batch:
                job.future.set_exception(exc)
            return
        for job in batch:
            self._db.execute("SAVEPOINT job")
            try:
                results.append((True, job.function(self._db)))
                self._db.execute("RELEASE job")
            except BaseException as exc:  # the job's own failure: undo it alone
                self._db.execute("ROLLBACK TO job")
                self._db.execute("RELEASE job")
                results.append((False, exc))
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:  # nothing of the batch happened
            log.exception("the state database could not commit %d writes", len(batch))
            self._db.execute("ROLLBACK")
            for job in batch:
                job.future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for job, (ok, value) in zip(batch, results, strict=True):
            if ok:
                job.future.set_result(value)
            else:
                job.future.set_exception(value)


class Store:
    """Typed reads and writes of the coordinator's state (see the module docstring)."""

    def __init__(self, folder: Path, recovering: bool = False) -> None:
        """Open (or create) the state in ``folder``; ``StateError`` if it cannot be trusted.

        ``recovering`` (``coordinator repair`` only) creates a database beside
        existing checkpoints, which a start refuses.
        """
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "coordinator.sqlite3"
        self._check_format(recovering)
        self._writer = _GroupCommitWriter(self.path)
        self._local = threading.local()
        if self.get_meta("schema") is None:
            self.set_meta("schema", str(SCHEMA_VERSION))

    def _check_format(self, recovering: bool) -> None:
        checkpoints = [] if recovering else self.checkpoint_files()
        empty = not self.path.exists() or self.path.stat().st_size == 0
        if empty and checkpoints:
            state = "missing" if not self.path.exists() else "empty"
            raise StateError(
                f"state folder {self.folder} holds checkpoints of a run (the latest "
                f"{checkpoints[-1].name}) but its database {self.path.name} is {state}: "
                "starting would begin a new run over them",
                f"restore {self.path.name} from a backup, or run 'heterofl-edge coordinator "
                f"repair --state-dir {self.folder}' to continue from the latest checkpoint "
                "with a new database (devices then register again)",
            )
        if not self.path.exists():
            return
        db = sqlite3.connect(self.path)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            schema = None
            if "meta" in tables:
                row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
                schema = row[0] if row else None
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"{self.path} is not a readable database ({exc})",
                "restore it from a backup, or start with a new --state-dir",
            ) from None
        finally:
            db.close()
        if checkpoints and "meta" not in tables:
            raise StateError(
                f"state folder {self.folder} holds checkpoints of a run but its database "
                f"{self.path.name} holds none of the run's records",
                f"restore {self.path.name} from a backup, or run 'heterofl-edge coordinator "
                f"repair --state-dir {self.folder}'",
            )
        if tables and schema != str(SCHEMA_VERSION):
            raise StateError(
                f"state folder {self.folder} was written by another version of heterofl-edge "
                f"(state format {schema or 1}, this one reads {SCHEMA_VERSION})",
                "start with a new --state-dir",
            )

    def close(self) -> None:
        self._writer.close()

    # -- plumbing ---------------------------------------------------------------
    def read(self) -> sqlite3.Connection:
        """The calling thread's read connection (WAL: reads never wait for the writer)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA query_only=ON")
            self._local.db = db
        return db

    def write(self, function: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``function`` in the next group commit; return once it is durable."""
        return self._writer.submit(function)

    @property
    def commit_stats(self) -> tuple[int, int]:
        """(transactions committed, jobs in them)."""
        return self._writer.batches, self._writer.jobs

    # -- meta ---------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.read().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        self.write(lambda db: _set_meta(db, key, value))

    # -- devices --------------------------------------------------------------------
    def add_device(
        self, device_id: str, token: str, profile: dict[str, Any], rate: float, now: float
    ) -> DeviceRow:
        """Register a device at the next position (positions are never reused)."""

        def insert(db: sqlite3.Connection) -> DeviceRow:
            position = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM devices").fetchone()[
                0
            ]
            row = DeviceRow(device_id, position, hash_token(token), profile, rate, now)
            db.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?)",
                (device_id, position, row.token_sha256, json.dumps(profile), rate, now),
            )
            return row

        return self.write(insert)

    def devices(self) -> list[DeviceRow]:
        rows = self.read().execute("SELECT * FROM devices ORDER BY position")
        return [
            DeviceRow(
                r["id"],
                r["position"],
                r["token_sha256"],
                json.loads(r["profile"]),
                r["rate"],
                r["registered_at"],
            )
            for r in rows
        ]

    def set_device_rates(self, rates: dict[str, float]) -> None:
        self.write(
            lambda db: db.executemany(
                "UPDATE devices SET rate = ? WHERE id = ?", [(r, d) for d, r in rates.items()]
            )
        )

    # -- rounds -------------------------------------------------------------------------
    def open_round(self, opened: RoundOpen) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO rounds (number, state, lr, opened_at, deadline, summary) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    opened.round,
                    Phase.training.value,
                    opened.lr,
                    opened.opened_at,
                    opened.deadline,
                    json.dumps(opened.summary, allow_nan=False),  # the pool it was drawn from
                ),
            )
            _insert_tasks(db, opened.round, Phase.training, opened.tasks)

        self.write(insert)

    def close_training(
        self, opened: RoundOpen, checkpoint: Checkpoint, policy_state: str | None
    ) -> None:
        """The round's aggregate is checkpointed: open its statistics phase."""

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE rounds SET state = ?, stats_deadline = ?, summary = ? WHERE number = ?",
                (
                    Phase.statistics.value,
                    opened.stats_deadline,
                    json.dumps(opened.summary, allow_nan=False),
                    opened.round,
                ),
            )
            _insert_tasks(db, opened.round, Phase.statistics, opened.stats_tasks)
            _set_meta(db, "checkpoint", json.dumps(checkpoint.__dict__))
            if policy_state is not None:
                _set_meta(db, "policy", policy_state)

        self.write(update)

    def finish_round(
        self,
        number: int,
        state: str,
        result: dict[str, Any],
        checkpoint: Checkpoint,
        policy_state: str | None,
    ) -> None:
        """Record the round's result, point at its final checkpoint, drop its payloads."""

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE rounds SET state = ?, result = ? WHERE number = ?",
                (state, json.dumps(result, allow_nan=False), number),
            )
            db.execute(
                "UPDATE tasks SET status = 'missed' WHERE round = ? AND status = 'assigned'",
                (number,),
            )
            db.execute("UPDATE tasks SET payload = NULL WHERE round = ?", (number,))
            _set_meta(db, "checkpoint", json.dumps(checkpoint.__dict__))
            if policy_state is not None:
                _set_meta(db, "policy", policy_state)

        self.write(update)

    def rounds(self) -> list[sqlite3.Row]:
        return list(self.read().execute("SELECT * FROM rounds ORDER BY number"))

    def open_round_row(self) -> sqlite3.Row | None:
        row: sqlite3.Row | None = (
            self.read()
            .execute(
                "SELECT * FROM rounds WHERE state NOT IN ('finished', 'failed') "
                "ORDER BY number DESC LIMIT 1"
            )
            .fetchone()
        )
        return row

    # -- tasks ----------------------------------------------------------------------------
    def round_state(self, number: int) -> str | None:
        row = self.read().execute("SELECT state FROM rounds WHERE number = ?", (number,)).fetchone()
        return None if row is None else str(row["state"])

    def tasks(self, number: int, phase: Phase | None = None) -> list[TaskRow]:
        query = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE round = ?"
        args: tuple[Any, ...] = (number,)
        if phase is not None:
            query += " AND phase = ?"
            args += (phase.value,)
        return [_task(r) for r in self.read().execute(query + " ORDER BY position", args)]

    def accept(
        self,
        number: int,
        phase: Phase,
        device_id: str,
        payload: bytes,
        received_at: float,
        seconds: float | None,
        num_samples: int | None = None,
        labels: Sequence[int] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Store an accepted result, if its task is still open; ``TaskClosed`` otherwise."""

        def update(db: sqlite3.Connection) -> None:
            cursor = db.execute(
                "UPDATE tasks SET status = 'uploaded', received_at = ?, seconds = ?, "
                "num_samples = ?, labels = ?, metrics = ?, payload = ?, sha256 = ?, size = ? "
                "WHERE round = ? AND phase = ? AND device_id = ? AND status = 'assigned' "
                "AND (SELECT state FROM rounds WHERE number = ?) = ?",
                (
                    received_at,
                    seconds,
                    num_samples,
                    None if labels is None else json.dumps(list(labels)),
                    None if metrics is None else json.dumps(metrics, allow_nan=False),
                    payload,
                    hashlib.sha256(payload).hexdigest(),
                    len(payload),
                    number,
                    phase.value,
                    device_id,
                    number,
                    phase.value,
                ),
            )
            if cursor.rowcount != 1:
                status = db.execute(
                    "SELECT status FROM tasks WHERE round = ? AND phase = ? AND device_id = ?",
                    (number, phase.value, device_id),
                ).fetchone()
                raise TaskClosed(status[0] if status else "missing")

        self.write(update)

    def close_phase(self, number: int, phase: Phase) -> None:
        """Refuse further results for the phase: its open tasks become 'missed'."""

        def update(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE tasks SET status = 'missed' "
                "WHERE round = ? AND phase = ? AND status = 'assigned'",
                (number, phase.value),
            )
            db.execute(
                "UPDATE rounds SET state = ? WHERE number = ? AND state = ?",
                (f"{phase.value}-closed", number, phase.value),
            )

        self.write(update)

    def payload(self, number: int, phase: Phase, device_id: str) -> bytes | None:
        row = (
            self.read()
            .execute(
                "SELECT payload FROM tasks WHERE round = ? AND phase = ? AND device_id = ?",
                (number, phase.value, device_id),
            )
            .fetchone()
        )
        return None if row is None else row["payload"]

    def uploaded(self, number: int, phase: Phase, skip: Iterable[str] = ()) -> list[TaskRow]:
        done = set(skip)
        rows = self.read().execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks "
            "WHERE round = ? AND phase = ? AND status = 'uploaded' ORDER BY received_at",
            (number, phase.value),
        )
        return [_task(r) for r in rows if r["device_id"] not in done]

    def discard_open_round(self, reason: str) -> int | None:
        """Mark the open round failed and drop its pending payloads (``coordinator repair``)."""

        def update(db: sqlite3.Connection) -> int | None:
            row = db.execute(
                "SELECT number FROM rounds WHERE state NOT IN ('finished', 'failed') "
                "ORDER BY number DESC LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            number = int(row[0])
            result = json.dumps({"round": number, "state": "failed", "reason": reason})
            db.execute(
                "UPDATE rounds SET state = 'failed', result = ? WHERE number = ?", (result, number)
            )
            db.execute(
                "UPDATE tasks SET status = 'missed', payload = NULL WHERE round = ?", (number,)
            )
            checkpoint = json.loads(_get_meta(db, "checkpoint") or "null")
            if checkpoint and checkpoint["stage"] == "aggregated":
                previous = checkpoint["completed_rounds"]
                checkpoint = {
                    "completed_rounds": previous,
                    "stage": "final",
                    "file": _checkpoint_name(previous, "final"),
                }
            final = dict(checkpoint or {"stage": "final", "file": ""})
            final["completed_rounds"] = number
            _set_meta(db, "checkpoint", json.dumps(final))
            return number

        return self.write(update)

    # -- checkpoints ------------------------------------------------------------------------
    def write_checkpoint(
        self, completed_rounds: int, stage: str, state: dict[str, torch.Tensor]
    ) -> Checkpoint:
        """Write a checkpoint file (atomically, fsynced); the caller commits the pointer.

        A file of that name is never overwritten: one with the same bytes is kept
        as it is, another (left by a crash before its pointer was committed) is
        moved to ``checkpoints/superseded/`` first, and the move is logged.
        """
        name = _checkpoint_name(completed_rounds, stage)
        path = self.folder / "checkpoints" / name
        metadata = {"completed_rounds": str(completed_rounds), "stage": stage}
        identity = self.get_meta("identity")
        if identity is not None:
            metadata["identity"] = identity  # lets 'coordinator repair' rebuild a lost database
        tensors = {k: v.contiguous() for k, v in state.items()}
        if path.exists():
            if _holds(path, tensors, metadata):
                return Checkpoint(completed_rounds, stage, name)
            aside = self.folder / "checkpoints" / "superseded" / f"{name}.{time.time_ns()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            path.rename(aside)
            log.warning("checkpoint %s existed with other contents; kept as %s", name, aside)
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return Checkpoint(completed_rounds, stage, name)

    def checkpoint_files(self) -> list[Path]:
        """The checkpoint files in the folder, oldest round first."""
        folder = self.folder / "checkpoints"
        return sorted(folder.glob("round-*.safetensors")) if folder.is_dir() else []

    def point_at(self, checkpoint: Checkpoint) -> None:
        self.set_meta("checkpoint", json.dumps(checkpoint.__dict__))

    def checkpoint(self) -> tuple[Checkpoint, dict[str, torch.Tensor]] | None:
        text = self.get_meta("checkpoint")
        if text is None:
            return None
        pointer = Checkpoint(**json.loads(text))
        path = self.folder / "checkpoints" / pointer.file
        try:
            return pointer, load(path.read_bytes())
        except (OSError, SafetensorError) as exc:
            raise StateError(
                f"checkpoint {path} cannot be read ({exc})",
                "restore the file from a backup, or run 'heterofl-edge coordinator repair "
                f"--state-dir {self.folder}' to go back to the latest checkpoint that reads",
            ) from None


class TaskClosed(Exception):
    """A result for a task that is no longer open; ``status`` says what it is now."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


_TASK_COLUMNS = (
    "round, phase, device_id, position, rate, lr, seed, status, received_at, seconds, "
    "num_samples, labels, metrics"
)


def _holds(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether the checkpoint at ``path`` holds exactly ``tensors`` and ``metadata``.

    Compared by content: safetensors writes metadata keys in no fixed order.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}) != metadata or set(handle.keys()) != set(tensors):
                return False
            return all(torch.equal(handle.get_tensor(k), v) for k, v in tensors.items())
    except (OSError, SafetensorError):
        return False


def _checkpoint_name(completed_rounds: int, stage: str) -> str:
    return f"round-{completed_rounds:04d}-{stage}.safetensors"


def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def _get_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _insert_tasks(db: sqlite3.Connection, number: int, phase: Phase, tasks: Sequence[Task]) -> None:
    db.executemany(
        "INSERT INTO tasks (round, phase, device_id, position, rate, lr, seed) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(number, phase.value, t.client, t.position, t.rate, t.lr, t.seed) for t in tasks],
    )


def _task(row: sqlite3.Row) -> TaskRow:
    return TaskRow(
        row["round"],
        Phase(row["phase"]),
        row["device_id"],
        row["position"],
        row["rate"],
        row["lr"],
        row["seed"],
        row["status"],
        row["received_at"],
        row["seconds"],
        row["num_samples"],
        None if row["labels"] is None else tuple(json.loads(row["labels"])),
        None if row["metrics"] is None else json.loads(row["metrics"]),
    )
