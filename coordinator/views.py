"""What the API shows of a running coordinator: health, devices, rounds (read only).

``ReadViews`` answers ``GET /v1/health``, ``/v1/devices`` and ``/v1/rounds``
(and the live page, which reads them) from the registry, the task board's
published view and the store's records. Nothing here writes; a round that
has ended is rendered once and kept, since it never changes again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from coordinator.artifacts import Artifacts
from coordinator.board import DeviceState, TaskBoard, TaskStatus
from coordinator.config import CoordinatorConfig
from coordinator.registry import DeviceRegistry
from coordinator.store import Store
from heterofl_edge.engine import Phase
from heterofl_edge.levels import rate_label

__all__ = ["ReadViews"]


class ReadViews:
    def __init__(
        self,
        config: CoordinatorConfig,
        model_name: str,
        run_id: str,
        store: Store,
        registry: DeviceRegistry,
        board: TaskBoard,
        artifacts: Artifacts,
        demo_data: bool,
        clock: Callable[[], float],
        completed: Callable[[], int],
        problem: Callable[[], str | None],
        privacy: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.config = config
        self.mix = config.level_mix
        self.model_name = model_name
        self.run_id = run_id  # which run this is: a device's --state-dir is bound to one
        self.store = store
        self.registry = registry
        self.board = board
        self.artifacts = artifacts
        self.demo_data = demo_data  # whether GET /v1/demo-data serves shards
        self.clock = clock
        self.completed = completed  # rounds the engine has completed
        self.problem = problem  # the last server fault, if any
        self.privacy = privacy  # a private run's budget (None: not private)
        self._ended_views: dict[int, dict[str, Any]] = {}

    def health(self) -> dict[str, Any]:
        view = self.board.view()
        state = None
        if view is not None:
            state = self.store.round_state(view.round)
        privacy = self.privacy()
        done = self.completed() >= self.config.total_rounds or bool(privacy and privacy["stopped"])
        status = (
            "ok" if self.artifacts.all_ready() or not self.config.build_artifacts else "starting"
        )
        if self.problem() is not None and not done:
            status = "degraded"
        return {
            "status": status,
            "model": self.model_name,
            "mode": self.mix.name,
            "policy": self.config.policy_name,
            "round": None if view is None else view.round,
            "round_state": state,
            "completed_rounds": self.completed(),
            "rounds": self.config.total_rounds,
            "done": done,
            "devices": len(self.registry),
            "live_devices": len(self.registry.live()),
            "artifacts_ready": self.artifacts.all_ready(),
            "reference_level": rate_label(min(self.mix.rates)),
            "reference_rate": min(self.mix.rates),
            "demo_data": self.demo_data,
            "evaluation": self._last_evaluation(),
            "privacy": privacy,
            "run_id": self.run_id,
            "problem": self.problem(),
        }

    def _last_evaluation(self) -> dict[str, Any] | None:
        """``{"round": N, **evaluation}`` of the last finished round, if it was evaluated."""
        row = (
            self.store.read()
            .execute(
                "SELECT number, result FROM rounds WHERE state = 'finished' "
                "AND result IS NOT NULL ORDER BY number DESC LIMIT 1"
            )
            .fetchone()
        )
        if row is None:
            return None
        evaluation = _json_loads(row["result"]).get("evaluation")
        if not isinstance(evaluation, dict) or not evaluation:
            return None
        return {"round": int(row["number"]), **evaluation}

    def device_views(self, offset: int = 0, limit: int = 100) -> dict[str, Any]:
        """Devices ``offset .. offset + limit - 1`` by position, with the list's ``total``.

        ``level`` is the device's level in the open round, else (profile policy)
        its profile level; ``trained_level`` is the level of the last training
        task it uploaded (null before its first upload).
        """
        now = self.clock()
        view = self.board.view()
        everyone = self.registry.all()
        page = everyone[offset : offset + limit]
        trained = self._trained_levels([d.id for d in page])
        devices = []
        for device in page:
            task = view.tasks.get(device.id) if view is not None else None
            level = rate_label(task.rate) if task is not None and view is not None else None
            if level is None and self.config.profiled:
                level = rate_label(device.rate)
            devices.append(
                {
                    "device_id": device.id,
                    "position": device.position,
                    "state": self.board.device_state(device, now).value,
                    "level": level,
                    "trained_level": trained.get(device.id),
                    "profile": device.profile,
                    "registered_at": device.registered_at,
                    "last_seen": device.last_seen,
                    "bytes_in": device.bytes_in,
                    "bytes_out": device.bytes_out,
                }
            )
        return {
            "policy": self.config.policy_name,
            "levels": self._level_shares(),
            "devices": devices,
            "total": len(everyone),
            "offset": offset,
            "limit": limit,
        }

    def _trained_levels(self, device_ids: list[str]) -> dict[str, str]:
        """Level of each device's last uploaded training task (devices without one: absent)."""
        if not device_ids:
            return {}
        marks = ",".join("?" * len(device_ids))
        # SQLite returns the bare column (rate) from the row that holds MAX(round).
        rows = self.store.read().execute(
            f"SELECT device_id, rate, MAX(round) FROM tasks WHERE phase = ? "
            f"AND status = 'uploaded' AND device_id IN ({marks}) GROUP BY device_id",
            (Phase.training.value, *device_ids),
        )
        return {str(r["device_id"]): rate_label(float(r["rate"])) for r in rows}

    def _level_shares(self) -> dict[str, float]:
        if self.config.profiled:
            counts = Counter(rate_label(d.rate) for d in self.registry.all())
            total = sum(counts.values())
            return {k: v / total for k, v in sorted(counts.items())} if total else {}
        total_weight = sum(self.mix.weights)
        return {
            rate_label(r): w / total_weight
            for r, w in zip(self.mix.rates, self.mix.weights, strict=True)
        }

    def device_counts(self) -> dict[tuple[str, str], int]:
        """Devices by (state, level): the Prometheus gauge."""
        now = self.clock()
        view = self.board.view()
        counts: Counter[tuple[str, str]] = Counter()
        for device in self.registry.all():
            task = view.tasks.get(device.id) if view is not None else None
            rate = task.rate if task is not None else device.rate
            counts[(self.board.device_state(device, now).value, rate_label(rate))] += 1
        return dict(counts)

    def history(self) -> list[dict[str, Any]]:
        """Every round, the open one included, as the API shows it."""
        view = self.board.view()
        out = []
        for row in self.store.rounds():
            number = int(row["number"])
            if number in self._ended_views:  # a round that ended never changes again
                out.append(self._ended_views[number])
                continue
            tasks = self.store.tasks(number)
            training = [t for t in tasks if t.phase is Phase.training]
            stats = {
                t.device_id: "asked" if t.status == "assigned" else t.status
                for t in tasks
                if t.phase is Phase.statistics
            }
            result = None if row["result"] is None else _json_loads(row["result"])
            live_status = {}
            if view is not None and view.round == number and view.phase is Phase.training:
                live_status = {t.device_id: self.board.status_of(t.device_id) for t in training}
            assignments = []
            for t in training:
                status = t.status
                if live_status.get(t.device_id) is TaskStatus.training and status == "assigned":
                    status = "training"
                device = self.registry.get(t.device_id)
                down, up, _ = self.config.encodings.choose(
                    t.rate, device.profile.get("encodings") if device is not None else None
                )
                moved = self.board.transfer.device(number, t.device_id) or {}
                assignments.append(
                    {
                        "device_id": t.device_id,
                        "level": rate_label(t.rate),
                        "status": status,
                        "statistics": stats.get(t.device_id, "none"),
                        "num_samples": t.num_samples,
                        "seconds": t.seconds,
                        "metrics": t.metrics,
                        "download_encoding": down.value,
                        "upload_encoding": up.value,
                        "bytes_down": moved.get("down"),
                        "bytes_up": moved.get("up"),
                    }
                )
            state = str(row["state"])
            summary = result or (_json_loads(row["summary"]) if row["summary"] else {})
            entry = {
                "round": number,
                "state": state.removesuffix("-closed"),
                "lr": row["lr"],
                "opened_at": row["opened_at"],
                "deadline": row["deadline"],
                "closed_at": summary.get("closed_at"),
                "finished_at": (result or {}).get("finished_at"),
                "selected": len(training),
                "uploads": sum(1 for t in training if t.status == "uploaded"),
                "quorum": self.config.min_uploads,
                "metrics": summary,
                "transfer": self.board.transfer.round(number),
                "assignments": assignments,
            }
            if state in ("finished", "failed"):
                self._ended_views[number] = entry
            out.append(entry)
        return out

    def device_state(self, device_id: str) -> DeviceState:
        device = self.registry.get(device_id)
        if device is None:
            return DeviceState.offline
        return self.board.device_state(device, self.clock())


def _json_loads(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
