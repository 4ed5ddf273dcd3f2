"""The buffered engine's journal on the coordinator's store: versions, tasks, acknowledged updates.

What a restart needs, and where it is kept (SQLite, one transaction each):

* every task handed out: a ``tasks`` row (phase training; its round is the
  version it starts from plus one, the version it trains toward, as a
  synchronous round r starts from the model of round r - 1), committed before
  any device can see the task;
* every acknowledged update: the task row's payload and status ``uploaded``,
  and an ``arrivals`` row whose ``seq`` (SQLite's AUTOINCREMENT, assigned in
  the transaction that acknowledges it) is the order the engine folds in;
* every published version: its checkpoint file, a ``rounds`` row (state
  ``statistics`` until its sBN statistics and evaluation are done, then
  ``finished``), and ``buffered_consumed``: the last ``seq`` folded into it.
  The folded arrivals' payloads are dropped in the same transaction.

A restart therefore resumes from the newest version's checkpoint, re-folds the
acknowledged updates after ``buffered_consumed`` in ``seq`` order (exactly the
order an uninterrupted run folded them in), and keeps waiting for the tasks
still out. Older versions' checkpoints (``round-NNNN-final``) give the bases
of updates that started from them, up to ``max_staleness`` versions back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from coordinator.policy import ProfileLevels
from coordinator.store import Checkpoint, StateError, Store, TaskClosed, TaskRow
from heterofl_edge.buffered_engine import BufferedResume, VersionTask
from heterofl_edge.engine import Phase, RoundOpen, RoundResult, Task
from heterofl_edge.slicing import Submodel

__all__ = ["BufferedRecords", "BufferedStoreJournal"]

State = dict[str, torch.Tensor]

log = logging.getLogger("heterofl_edge.coordinator")

_ARRIVALS = """
CREATE TABLE IF NOT EXISTS arrivals (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, device_id TEXT NOT NULL,
    UNIQUE (round, device_id)
)
"""
_CONSUMED = "buffered_consumed"
_COLUMNS = (
    "t.round, t.phase, t.device_id, t.position, t.rate, t.lr, t.seed, t.status, "
    "t.received_at, t.seconds, t.num_samples, t.labels, t.metrics"
)


def _row(row: sqlite3.Row) -> TaskRow:
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


def _set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


class BufferedRecords:
    """The buffered run's rows in the coordinator's store (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        store.write(lambda db: db.execute(_ARRIVALS))

    # -- tasks and acknowledgements --------------------------------------------------
    def add_tasks(self, tasks: Sequence[VersionTask]) -> None:
        """Record handed-out training tasks (durable before a device can see them)."""
        training = Phase.training.value
        rows = [
            (
                t.version + 1,
                training,
                t.client,
                t.task.position,
                t.task.rate,
                t.task.lr,
                t.task.seed,
            )
            for t in tasks
        ]

        def insert(db: sqlite3.Connection) -> None:
            # A device's earlier task from the same version that it never delivered (it went
            # silent, was given up on, and is asked again) is replaced.
            db.executemany(
                "INSERT OR REPLACE INTO tasks (round, phase, device_id, position, rate, lr, seed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

        self.store.write(insert)

    def accept(
        self,
        number: int,
        device_id: str,
        payload: bytes,
        received_at: float,
        seconds: float | None,
        num_samples: int | None,
        labels: Sequence[int] | None,
        metrics: dict[str, float] | None,
    ) -> int:
        """Store an acknowledged update of the task of round ``number``; its fold position.

        The fold position (its ``seq``) is the next one; ``TaskClosed`` if the task
        is no longer open.
        """
        digest = hashlib.sha256(payload).hexdigest()

        def update(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "UPDATE tasks SET status = 'uploaded', received_at = ?, seconds = ?, "
                "num_samples = ?, labels = ?, metrics = ?, payload = ?, sha256 = ?, size = ? "
                "WHERE round = ? AND phase = ? AND device_id = ? AND status = 'assigned'",
                (
                    received_at,
                    seconds,
                    num_samples,
                    None if labels is None else json.dumps(list(labels)),
                    None if metrics is None else json.dumps(metrics, allow_nan=False),
                    payload,
                    digest,
                    len(payload),
                    number,
                    Phase.training.value,
                    device_id,
                ),
            )
            if cursor.rowcount != 1:
                status = db.execute(
                    "SELECT status FROM tasks WHERE round = ? AND phase = ? AND device_id = ?",
                    (number, Phase.training.value, device_id),
                ).fetchone()
                raise TaskClosed(status[0] if status else "missing")
            inserted = db.execute(
                "INSERT INTO arrivals (round, device_id) VALUES (?, ?)", (number, device_id)
            )
            seq = inserted.lastrowid
            assert seq is not None
            return int(seq)

        return self.store.write(update)

    def refuse(self, tasks: Sequence[VersionTask], status: str) -> None:
        """Close open tasks without a result: ``stale`` (refused) or ``missed`` (given up)."""
        keys = [(status, t.version + 1, Phase.training.value, t.client) for t in tasks]
        self.store.write(
            lambda db: db.executemany(
                "UPDATE tasks SET status = ? WHERE round = ? AND phase = ? AND device_id = ? "
                "AND status = 'assigned'",
                keys,
            )
        )

    def arrivals_after(self, seq: int) -> list[tuple[int, TaskRow]]:
        """Acknowledged updates after ``seq``, in fold order (with their task rows).

        A row's round is its task's: the version it started from plus one.
        """
        rows = self.store.read().execute(
            f"SELECT a.seq, {_COLUMNS} FROM arrivals a JOIN tasks t ON t.round = a.round "
            "AND t.phase = 'training' AND t.device_id = a.device_id "
            "WHERE a.seq > ? AND t.status = 'uploaded' ORDER BY a.seq",
            (seq,),
        )
        return [(int(r["seq"]), _row(r)) for r in rows]

    def open_tasks(self, consumed: int) -> list[TaskRow]:
        """Training tasks not yet folded: out (assigned), or acknowledged after ``consumed``."""
        rows = self.store.read().execute(
            f"SELECT {_COLUMNS} FROM tasks t LEFT JOIN arrivals a ON a.round = t.round "
            "AND a.device_id = t.device_id WHERE t.phase = 'training' AND (t.status = 'assigned' "
            "OR (t.status = 'uploaded' AND a.seq > ?)) ORDER BY t.round, t.position",
            (consumed,),
        )
        return [_row(r) for r in rows]

    def consumed(self) -> int:
        return int(self.store.get_meta(_CONSUMED) or 0)

    # -- versions ---------------------------------------------------------------------
    def publish(
        self,
        opened: RoundOpen,
        checkpoint: Checkpoint,
        consumed: int,
        policy_state: str | None,
    ) -> None:
        """Version ``opened.round`` is checkpointed: its row, statistics tasks and fold point."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO rounds (number, state, lr, opened_at, deadline, stats_deadline, "
                "summary) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    opened.round,
                    Phase.statistics.value,
                    opened.lr,
                    opened.opened_at,
                    opened.deadline,
                    opened.stats_deadline,
                    json.dumps(opened.summary, allow_nan=False),
                ),
            )
            db.executemany(
                "INSERT INTO tasks (round, phase, device_id, position, rate, lr, seed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (opened.round, Phase.statistics.value, t.client, t.position, t.rate, 0.0, 0)
                    for t in opened.stats_tasks
                ],
            )
            db.execute(
                "UPDATE tasks SET payload = NULL WHERE phase = 'training' AND payload IS NOT NULL "
                "AND EXISTS (SELECT 1 FROM arrivals a WHERE a.round = tasks.round "
                "AND a.device_id = tasks.device_id AND a.seq <= ?)",
                (consumed,),
            )
            _set_meta(db, _CONSUMED, str(consumed))
            _set_meta(db, "checkpoint", json.dumps(checkpoint.__dict__))
            if policy_state is not None:
                _set_meta(db, "policy", policy_state)

        self.store.write(write)

    def finish(
        self,
        number: int,
        result: dict[str, Any],
        checkpoint: Checkpoint,
        policy_state: str | None,
    ) -> None:
        """The version's statistics and evaluation are done: its result, its final checkpoint."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE rounds SET state = 'finished', result = ? WHERE number = ?",
                (json.dumps(result, allow_nan=False), number),
            )
            db.execute(
                "UPDATE tasks SET status = 'missed' WHERE round = ? AND phase = ? "
                "AND status = 'assigned'",
                (number, Phase.statistics.value),
            )
            db.execute(
                "UPDATE tasks SET payload = NULL WHERE round = ? AND phase = ?",
                (number, Phase.statistics.value),
            )
            _set_meta(db, "checkpoint", json.dumps(checkpoint.__dict__))
            if policy_state is not None:
                _set_meta(db, "policy", policy_state)

        self.store.write(write)

    def version_state(self, version: int) -> State:
        """The global model of a published version, from its checkpoint file."""
        for stage, number in (("final", version), ("aggregated", version - 1)):
            path = self.store.folder / "checkpoints" / f"round-{number:04d}-{stage}.safetensors"
            if path.is_file():
                try:
                    return load(path.read_bytes())
                except (OSError, SafetensorError) as exc:
                    raise StateError(
                        f"checkpoint {path} cannot be read ({exc})",
                        "restore the file from a backup",
                    ) from None
        raise StateError(
            f"no checkpoint of version {version} in {self.store.folder / 'checkpoints'}",
            "restore the state folder from a backup, or start a new --state-dir",
        )

    def published_version(self) -> int:
        """The newest published version (the checkpoint pointer's)."""
        found = self.store.get_meta("checkpoint")
        if found is None:
            return 0
        pointer = Checkpoint(**json.loads(found))
        return pointer.completed_rounds + (1 if pointer.stage == "aggregated" else 0)


class BufferedStoreJournal:
    """Implements ``heterofl_edge.buffered_engine.BufferedJournal`` on the coordinator's store."""

    def __init__(
        self,
        records: BufferedRecords,
        policy: ProfileLevels | None,
        on_finished: Callable[[RoundResult, State], None],
        submodel: Submodel,
        max_staleness: int,
    ) -> None:
        self.records = records
        self.store = records.store
        self.policy = policy
        self.on_finished = on_finished
        self.submodel = submodel
        self.max_staleness = max_staleness

    def _policy_state(self) -> str | None:
        return None if self.policy is None else self.policy.state()

    def resume(self) -> BufferedResume:
        found = self.store.checkpoint()
        if found is None:
            raise RuntimeError("the coordinator writes the initial checkpoint before resuming")
        pointer, state = found
        if self.policy is not None:
            self.policy.restore(self.store.get_meta("policy"))
        version = self.records.published_version()
        versions = {
            v: self.records.version_state(v)
            for v in range(max(0, version - self.max_staleness), version)
        }
        versions[version] = state
        consumed = self.records.consumed()
        in_flight = tuple(
            VersionTask(
                Task(
                    row.device_id,
                    row.position,
                    row.rate,
                    row.lr,
                    row.seed,
                    self.submodel.offset(row.round),
                ),
                row.round - 1,
                0.0,
            )
            for row in self.records.open_tasks(consumed)
        )
        statistics = None
        if pointer.stage == "aggregated":  # published; statistics and evaluation not done
            row = self.store.open_round_row()
            if row is None or int(row["number"]) != version:
                raise StateError(
                    f"version {version} is checkpointed but has no open record",
                    f"run 'heterofl-edge coordinator repair --state-dir {self.store.folder}'",
                )
            statistics = RoundOpen(
                version,
                Phase.statistics,
                float(row["lr"]),
                (),
                float(row["opened_at"]),
                float(row["deadline"]),
                tuple(
                    Task(t.device_id, t.position, t.rate)
                    for t in self.store.tasks(version, Phase.statistics)
                ),
                row["stats_deadline"],
                json.loads(row["summary"]) if row["summary"] else {},
            )
        completed = pointer.completed_rounds
        return BufferedResume(version, versions, in_flight, consumed, completed, statistics)

    def tasks_dispatched(self, tasks: Sequence[VersionTask]) -> None:
        self.records.add_tasks(tasks)

    def version_published(self, opened: RoundOpen, state: State, consumed: int) -> None:
        checkpoint = self.store.write_checkpoint(opened.round - 1, "aggregated", state)
        self.records.publish(opened, checkpoint, consumed, self._policy_state())
        buffer = opened.summary.get("buffer", {})
        log.info(
            "version %d published: %d updates folded (staleness %s), %d refused as stale, "
            "%d lost; asking %d devices for sBN statistics",
            opened.round,
            len(opened.tasks),
            buffer.get("staleness"),
            buffer.get("refused_stale", 0),
            buffer.get("lost", 0),
            len(opened.stats_tasks),
            extra={"round": opened.round},
        )

    def round_finished(self, result: RoundResult, state: State) -> None:
        checkpoint = self.store.write_checkpoint(result.round, "final", state)
        self.records.finish(result.round, result.to_json(), checkpoint, self._policy_state())
        self.on_finished(result, state)
