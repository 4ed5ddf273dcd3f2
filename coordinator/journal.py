"""The round engine's journal on the coordinator's store: checkpoints that survive restarts."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable

import torch

from coordinator.policy import ProfileLevels
from coordinator.store import Checkpoint, Store, TaskRow
from heterofl_edge.engine import Phase, ResumePoint, RoundOpen, RoundResult, Task
from heterofl_edge.levels import rate_label
from heterofl_edge.slicing import Submodel

__all__ = ["StoreJournal"]

State = dict[str, torch.Tensor]

log = logging.getLogger("heterofl_edge.coordinator")


class StoreJournal:
    """Implements ``heterofl_edge.engine.Journal``; the store must hold a checkpoint."""

    def __init__(
        self,
        store: Store,
        policy: ProfileLevels | None,
        on_finished: Callable[[RoundResult, State], None],
        submodel: Submodel = Submodel.static,
    ) -> None:
        self.store = store
        self.policy = policy
        self.on_finished = on_finished
        self.submodel = submodel  # a round's windows start where the rule says (FedRolex)

    def _policy_state(self) -> str | None:
        return None if self.policy is None else self.policy.state()

    def resume(self) -> ResumePoint:
        found = self.store.checkpoint()
        if found is None:
            raise RuntimeError("the coordinator writes the initial checkpoint before resuming")
        pointer, state = found
        if self.policy is not None:
            self.policy.restore(self.store.get_meta("policy"))
        history = tuple(
            privacy
            for r in self.store.rounds()
            if r["result"] is not None
            and (privacy := json.loads(r["result"]).get("privacy")) is not None
        )
        row = self.store.open_round_row()
        if row is None:
            return ResumePoint(pointer.completed_rounds, state, None, history)
        number = int(row["number"])
        phase = Phase.training if str(row["state"]).startswith("training") else Phase.statistics
        summary = json.loads(row["summary"]) if row["summary"] else {}
        offset = self.submodel.offset(number)
        opened = RoundOpen(
            number,
            phase,
            float(row["lr"]),
            tuple(_task(t, offset) for t in self.store.tasks(number, Phase.training)),
            float(row["opened_at"]),
            float(row["deadline"]),
            tuple(_task(t) for t in self.store.tasks(number, Phase.statistics)),
            row["stats_deadline"],
            summary,
        )
        return ResumePoint(pointer.completed_rounds, state, opened, history)

    def round_opened(self, opened: RoundOpen) -> None:
        self.store.open_round(opened)
        levels = Counter(rate_label(t.rate) for t in opened.tasks)
        log.info(
            "round %d opened: %d devices selected (%s), deadline in %s",
            opened.round,
            len(opened.tasks),
            ", ".join(f"{n} at {level}" for level, n in sorted(levels.items())),
            _seconds(opened.deadline - opened.opened_at),
            extra={"round": opened.round},
        )

    def training_closed(self, opened: RoundOpen, state: State) -> None:
        checkpoint = self.store.write_checkpoint(opened.round - 1, "aggregated", state)
        self.store.close_training(opened, checkpoint, self._policy_state())
        summary = opened.summary
        log.info(
            "round %d training closed: %s of %s selected uploaded, %s timed out; "
            "asking %d devices for sBN statistics",
            opened.round,
            summary.get("uploads"),
            summary.get("selected"),
            summary.get("timed_out"),
            len(opened.stats_tasks),
            extra={"round": opened.round},
        )

    def round_finished(self, result: RoundResult, state: State) -> None:
        if result.state == "finished":
            checkpoint = self.store.write_checkpoint(result.round, "final", state)
        else:  # the model did not change: point at the one it has
            found = self.store.checkpoint()
            file = found[0].file if found else ""
            checkpoint = Checkpoint(result.round, "final", file)
        self.store.finish_round(
            result.round, result.state, result.to_json(), checkpoint, self._policy_state()
        )
        self.on_finished(result, state)


def _seconds(value: float) -> str:
    return "no deadline" if not math.isfinite(value) else f"{value:.0f} s"


def _task(row: TaskRow, offset: int = 0) -> Task:
    return Task(row.device_id, row.position, row.rate, row.lr, row.seed, offset)
