"""The coordinator, assembled: store, devices, task board, round engine on a worker thread.

``Coordinator`` wires the parts and owns the worker thread that runs the
round engine (``heterofl_edge.engine.RoundEngine``, the same engine
``simulate`` runs) with the task board as its transport. Request threads
only ever touch the board, the registry and read-only views; everything
slow (exporting artifacts, closing rounds, checkpoints, sBN statistics,
evaluation) happens on the worker.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from coordinator.admission import Admission
from coordinator.artifacts import Artifacts, ExportStopped
from coordinator.board import DeviceState, TaskBoard, TaskSettings, TaskStatus, Waker, encode_state
from coordinator.config import CoordinatorConfig
from coordinator.demo_data import DemoData
from coordinator.errors import ApiError, ErrorCode
from coordinator.evaluation import HeldOutEvaluation
from coordinator.intake import parse_statistics, parse_update
from coordinator.journal import StoreJournal
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import (
    DeviceProfile,
    LevelCost,
    MemoryCappedLevels,
    ProfileLevels,
    choose_rate,
    memory_cap,
    memory_needed_mb,
)
from coordinator.registry import DeviceRegistry
from coordinator.store import StateError, Store
from heterofl_edge.complexity import measure_complexity
from heterofl_edge.engine import Phase, RoundEngine, RoundResult, Stopped
from heterofl_edge.errors import ConfigError
from heterofl_edge.federation import build_engine
from heterofl_edge.levels import rate_label
from heterofl_edge.models import Architecture, get_architecture
from heterofl_edge.protocol import Registered, Runtime
from heterofl_edge.report import atomic_write_bytes

__all__ = ["Clock", "Coordinator"]

log = logging.getLogger("heterofl_edge.coordinator")

Clock = Callable[[], float]
RUN_ID_FILE = "run-id"  # beside the database: 'coordinator repair' keeps it, a new folder has none


class Coordinator:
    def __init__(self, config: CoordinatorConfig, clock: Clock = time.time) -> None:
        self.config = config  # validated in its constructor
        self.clock = clock
        self.arch = get_architecture(config.model)
        self.mix = config.level_mix
        self.store = Store(config.state_dir)
        self._check_identity()
        self.run_id = _run_id(config.state_dir)
        self.metrics = CoordinatorMetrics()
        self.admission = Admission(config.admission, clock)
        self.registry = DeviceRegistry(self.store, clock, config.device_timeout)
        self.waker = Waker()
        local = config.local_training
        self.board = TaskBoard(
            self.store,
            self.registry,
            self.arch,
            self.mix.global_rate,
            TaskSettings(
                local.epochs,
                local.batch_size,
                local.momentum,
                local.weight_decay,
                local.clip_grad_norm,
                config.artifact_formats,
                config.poll_seconds,
                config.heartbeat_interval,
            ),
            clock,
            self.waker,
            on_result=lambda kind, size: self.metrics.uploads.labels(kind, "accepted").inc(),
        )
        self.artifacts = Artifacts(config, self.arch, self.mix.rates, self.mix.global_rate)
        _ = self.level_costs  # measured once, at start-up, rather than on a request thread
        self.policy: ProfileLevels | None = None
        if config.profiled:
            self.policy = ProfileLevels(
                self.level_costs,
                config.level_table,
                lambda device_id: self._device_rate(device_id),
                self.registry.set_rates,
                cap_of=self._memory_cap,
            )
        self.evaluation = (
            None
            if config.data_dir is None
            else HeldOutEvaluation(
                self.arch,
                self.mix.global_rate,
                config.data_dir,
                config.test_examples,
                config.data_name,
                config.seed,
            )
        )
        self.demo_data = (
            None
            if config.demo_data_dir is None
            else DemoData(config.demo_data_dir, config.data_name, self.arch)
        )
        self.problem: str | None = None
        self._ended_views: dict[int, dict[str, Any]] = {}
        self._model_bytes = b""
        self._completed = 0
        torch.manual_seed(config.seed)
        model = self.arch.build(self.mix.global_rate, self.mix.global_rate)
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        found = self.store.checkpoint()
        if found is None:
            self.store.point_at(self.store.write_checkpoint(0, "final", initial))
        else:
            self._check_checkpoint(found[0].file, found[1], initial)
        self.journal = StoreJournal(self.store, self.policy, self._round_finished, config.submodel)
        self.engine = self._make_engine()
        self._check_open_round()
        self._publish_model(self.engine.global_state, self.engine.completed)
        self.metrics.watch_devices(self._device_counts)
        self._worker: threading.Thread | None = None
        self.activity = "starting"  # what the worker is doing, for the log when it stops
        self._announced = False

    # -- set-up ---------------------------------------------------------------------
    def _check_identity(self) -> None:
        identity = f"{self.arch.name}|{self.mix.name}|{self.config.policy_name}"
        stored = self.store.get_meta("identity")
        if stored is None:
            self.store.set_meta("identity", identity)
        elif stored != identity:
            raise ConfigError(
                f"state dir {self.config.state_dir} holds a run of {stored.replace('|', ', ')}",
                "use the same --model, --mode and --policy to resume, or a new --state-dir",
            )

    def _check_checkpoint(
        self,
        name: str,
        state: dict[str, torch.Tensor],
        reference: dict[str, torch.Tensor],
    ) -> None:
        """``StateError`` unless the model to resume is this run's: same tensors, finite."""
        problem = checkpoint_problem(state, reference)
        if problem is not None:
            raise StateError(
                f"checkpoint {name} in {self.config.state_dir} cannot be served: {problem}",
                "run 'heterofl-edge coordinator repair --state-dir "
                f"{self.config.state_dir}' to go back to the latest sound checkpoint",
            )

    def _make_engine(self) -> RoundEngine:
        return build_engine(
            self.config,
            self.board,
            self.journal,
            lambda: {},  # the store always holds a checkpoint (written at start-up)
            self.clock,
            population=None,  # the registered devices, counted every round
            quorum=self.config.quorum,
            # Fix and Dynamic: the strategy's draw, capped by each device's memory.
            policy=self.policy if self.policy is not None else MemoryCappedLevels(self._memory_cap),
            evaluate=self._evaluate if self.evaluation is not None else None,
            has_statistics=bool(self.board.bn_widths()),
        )

    def _check_open_round(self) -> None:
        """Refuse to start on stored results that no longer pass the checks (a damaged folder)."""
        row = self.store.open_round_row()
        if row is None:
            return
        number = int(row["number"])
        training = {t.device_id: t for t in self.store.tasks(number, Phase.training)}
        for phase in (Phase.training, Phase.statistics):
            for task in self.store.uploaded(number, phase):
                payload = self.store.payload(number, phase, task.device_id)
                try:
                    if payload is None:
                        raise ApiError(ErrorCode.bad_payload, "its bytes are missing")
                    if phase is Phase.training:
                        parse_update(payload, self.arch.spec, task.rate, self.arch.num_classes)
                    else:
                        expected = int(training[task.device_id].num_samples or 0)
                        parse_statistics(payload, self.board.bn_widths(), expected)
                except ApiError as exc:
                    raise StateError(
                        f"round {number} holds a stored {phase.value} result of device "
                        f"{task.device_id} that does not pass the checks ({exc.message})",
                        f"run 'heterofl-edge coordinator repair --state-dir "
                        f"{self.config.state_dir}' to discard the open round, then start again",
                    ) from None

    @cached_property
    def level_costs(self) -> list[LevelCost]:
        costs = []
        for rate in self.mix.rates:
            c = measure_complexity(self.arch, rate)
            activations = _activation_elements(self.arch, rate, self.mix.global_rate)
            costs.append(LevelCost(rate, c.flops, 4 * c.parameters, 4 * activations))
        return costs

    def _memory_cap(self, device_id: str) -> float:
        """The largest rate a registered device's memory trains (its profile, as registered)."""
        device = self.registry.get(device_id)
        if device is None:
            return self.mix.global_rate
        cap = memory_cap(
            DeviceProfile.from_json(device.profile),
            self.level_costs,
            self.config.level_table,
            self.config.local_training.batch_size,
        )
        return cap if cap is not None else min(self.mix.rates)  # registered before the check

    def _device_rate(self, device_id: str) -> float:
        device = self.registry.get(device_id)
        return device.rate if device is not None else min(self.mix.rates)

    # -- the worker -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker: build artifacts, then run rounds until done or stopped."""
        self._worker = threading.Thread(target=self._work, name="round-engine", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        try:
            backoff = 1.0
            while not self.board.stopping():
                try:
                    if self.config.build_artifacts:
                        self.activity = "exporting artifacts"
                        self.artifacts.build_all(self.board.stopping)
                    self._say_ready()
                    self.activity = "running rounds"
                    self.engine.run()
                    if self.engine.done:
                        self.board.finish(self.config.total_rounds)
                        log.info("done: %d rounds finished", self.config.total_rounds)
                        return
                    if self.board.stopping():
                        return
                except ExportStopped:
                    log.info("export stopped; it resumes at the next start")
                    return
                except Exception as exc:  # a fault on the server: log, report, retry
                    log.exception("the round engine failed; retrying from the last checkpoint")
                    self.problem = f"{type(exc).__name__}: {exc}"
                    self.waker.sleep(backoff)
                    backoff = min(backoff * 2, 60.0)
                    try:
                        self.engine = self._make_engine()
                    except Exception:
                        log.exception("resuming from the last checkpoint failed")
        finally:
            self.waker.close()

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the worker has handled everything that happened so far (tests)."""
        return self.waker.settle(timeout)

    def _say_ready(self) -> None:
        if self._announced:
            return
        self._announced = True
        levels = ", ".join(self.artifacts.ready_levels()) or "none (--no-artifacts)"
        if self.engine.done:
            log.info(
                "ready: levels %s served; all %d rounds are done", levels, self.config.total_rounds
            )
            return
        log.info(
            "ready: levels %s served; %d of %d rounds done; round %d opens once %d devices "
            "are live (%d registered)",
            levels,
            self.engine.completed,
            self.config.total_rounds,
            self.engine.completed + 1,
            self.config.min_devices if self.engine.completed == 0 else self.config.min_uploads,
            len(self.registry),
        )

    def close(self) -> None:
        """Stop the worker at its next safe point, wait for it, then close the store.

        Nothing is abandoned to the interpreter's exit: an export child is ended
        (its staging folder removed), an evaluation stops at its next batch, and
        whatever else the worker does (aggregating, writing a checkpoint) is
        short and finished. The journal then holds a state a restart resumes.
        """
        self.board.stop()
        worker = self._worker
        if worker is not None and worker.is_alive():
            log.info("stopping: waiting for the round engine (%s)", self.activity)
            worker.join(timeout=30.0)
            while worker.is_alive():
                log.info("stopping: still waiting for the round engine (%s)", self.activity)
                worker.join(timeout=30.0)
        self.store.close()

    def _evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        assert self.evaluation is not None
        number = self.engine.completed + 1
        previous, self.activity = self.activity, f"evaluating round {number}"
        log.info("round %d: evaluating the global model", number, extra={"round": number})
        start = time.perf_counter()
        try:
            return self.evaluation(state, self.board.stopping)
        except Stopped:
            log.info(
                "round %d: evaluation interrupted by the stop; it runs again at the next start",
                number,
                extra={"round": number},
            )
            raise
        finally:
            self.activity = previous
            self.metrics.evaluation_seconds.observe(time.perf_counter() - start)

    def _round_finished(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        self.metrics.rounds.labels(result.state).inc()
        if "aggregation" in result.seconds:
            self.metrics.aggregation_seconds.observe(result.seconds["aggregation"])
        self._publish_model(state, result.round)
        scores = ", ".join(
            f"{name} {value:.4g}"
            for name, value in result.evaluation.items()
            if name.startswith("global_") and value is not None
        )
        log.info(
            "round %d %s: %d of %d selected uploaded, %d timed out%s%s",
            result.round,
            result.state,
            result.uploads,
            result.selected,
            result.timed_out,
            f"; {scores}" if scores else "",
            f" ({result.reason})" if result.reason else "",
            extra={"round": result.round},
        )

    def _publish_model(self, state: dict[str, torch.Tensor], completed: int) -> None:
        self._model_bytes = encode_state(state, {"completed_rounds": str(completed)})
        self._completed = completed

    # -- what the API asks ------------------------------------------------------------------
    def register(self, profile: dict[str, Any]) -> Registered:
        """A new device for a profile the schema accepted; 400 if this run cannot use it."""
        cap = self._check_profile(profile)
        rate = self.mix.global_rate
        if self.policy is not None:
            local = self.config.local_training
            rate = choose_rate(
                DeviceProfile.from_json(profile),
                self.level_costs,
                self.config.level_table,
                self.config.round_seconds,
                local.epochs,
                local.batch_size,
            )
        device, token = self.registry.register(profile, rate)
        self.waker.poke()
        profiled = self.config.profiled
        log.info(
            "device %s registered: %s device, %s",
            device.id,
            device_kind(profile),
            f"level {rate_label(rate)}"
            if profiled
            else f"level per round ({self.config.policy_name})",
            extra={"device": device.id},
        )
        return Registered(
            device_id=device.id,
            token=token,
            level=rate_label(rate) if profiled else None,
            rate=rate if profiled else None,
            policy=self.config.policy_name,
            max_level=rate_label(cap),
            max_rate=cap,
            poll_seconds=self.config.poll_seconds,
            heartbeat_seconds=self.config.heartbeat_interval,
        )

    def _check_profile(self, profile: dict[str, Any]) -> float:
        """The largest rate the device's memory trains, for a profile this run can place.

        ``ApiError`` otherwise: another mode, another format, too little memory.
        """
        reference = float(profile["reference_rate"])
        if not any(math.isclose(reference, r, rel_tol=1e-9) for r in self.mix.rates):
            accepted = ", ".join(f"{r:g} ({rate_label(r)})" for r in sorted(self.mix.rates))
            raise ApiError(
                ErrorCode.bad_profile,
                f"reference_rate {reference:g} is not a level of mode {self.mix.name}: "
                f"accepted rates are {accepted}",
                "time the reference level that GET /v1/health names "
                f"({rate_label(min(self.mix.rates))})",
            )
        offered = set(self.config.artifact_formats)
        usable = [r for r in profile["runtimes"] if Runtime(r).artifact_format in offered]
        if not usable:
            raise ApiError(
                ErrorCode.unsupported_runtime,
                f"this coordinator offers {', '.join(sorted(offered))} artifacts; the device "
                f"trains on {', '.join(profile['runtimes'])}",
                "use a runtime of an offered format, or start the coordinator with "
                "--formats onnx,executorch",
            )
        return self._check_memory(DeviceProfile.from_json(profile))

    def _check_memory(self, device: DeviceProfile) -> float:
        """The largest rate whose training fits ``device``; 400 ``insufficient_memory`` if none."""
        batch = self.config.local_training.batch_size
        cap = memory_cap(device, self.level_costs, self.config.level_table, batch)
        if cap is not None:
            return cap
        smallest = min(self.level_costs, key=lambda lv: lv.rate)
        top = max(self.level_costs, key=lambda lv: lv.rate)
        needed = memory_needed_mb(smallest, top, self.config.level_table, batch)
        held = (
            f" ({device.base_memory_mb:.0f} MB of it held by the device's process)"
            if device.base_memory_mb
            else ""
        )
        raise ApiError(
            ErrorCode.insufficient_memory,
            f"a memory limit of {device.memory_mb:g} MB{held} fits no level of mode "
            f"{self.mix.name}: the smallest, {rate_label(smallest.rate)}, needs about "
            f"{needed:.0f} MB more than the process",
            f"raise the device's --max-memory-mb to at least "
            f"{math.ceil(device.base_memory_mb + needed)}, or run smaller levels",
        )

    def model_bytes(self) -> bytes:
        return self._model_bytes

    @property
    def completed_rounds(self) -> int:
        return self._completed

    def health(self) -> dict[str, Any]:
        view = self.board.view()
        state = None
        if view is not None:
            state = self.store.round_state(view.round)
        done = self._completed >= self.config.total_rounds
        status = (
            "ok" if self.artifacts.all_ready() or not self.config.build_artifacts else "starting"
        )
        if self.problem is not None and not done:
            status = "degraded"
        return {
            "status": status,
            "model": self.arch.name,
            "mode": self.mix.name,
            "policy": self.config.policy_name,
            "round": None if view is None else view.round,
            "round_state": state,
            "completed_rounds": self._completed,
            "rounds": self.config.total_rounds,
            "done": done,
            "devices": len(self.registry),
            "live_devices": len(self.registry.live()),
            "artifacts_ready": self.artifacts.all_ready(),
            "reference_level": rate_label(min(self.mix.rates)),
            "reference_rate": min(self.mix.rates),
            "demo_data": self.demo_data is not None,
            "run_id": self.run_id,
            "problem": self.problem,
        }

    def device_views(self) -> dict[str, Any]:
        now = self.clock()
        view = self.board.view()
        devices = []
        for device in self.registry.all():
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
        }

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

    def _device_counts(self) -> dict[tuple[str, str], int]:
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
                assignments.append(
                    {
                        "device_id": t.device_id,
                        "level": rate_label(t.rate),
                        "status": status,
                        "statistics": stats.get(t.device_id, "none"),
                        "num_samples": t.num_samples,
                        "seconds": t.seconds,
                        "metrics": t.metrics,
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


def _run_id(state_dir: Path) -> str:
    """The run's identity: made at its first start, kept in STATE/run-id for good.

    A file beside the database rather than a row in it, so that a database that
    'coordinator repair' rebuilds keeps the run's identity and its devices.
    """
    path = state_dir / RUN_ID_FILE
    try:
        found = path.read_text().strip()
    except FileNotFoundError:
        found = ""
    if re.fullmatch(r"[0-9a-f]{32}", found):
        return found
    if found:
        raise StateError(
            f"{path} does not hold a run id (32 hexadecimal digits)",
            f"remove {path}: the coordinator makes a new one (devices with a --state-dir "
            "then register again)",
        )
    made = secrets.token_hex(16)
    atomic_write_bytes(path, f"{made}\n".encode())
    return made


def _activation_elements(arch: Architecture, rate: float, global_rate: float) -> int:
    """Elements of every layer's output for one training example at ``rate``.

    What a training step keeps for its backward pass scales with this; the
    memory estimate (``coordinator.policy.training_memory_mb``) multiplies it.
    """
    model = arch.build(rate, global_rate)
    total = 0

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    model.train()
    try:
        with torch.no_grad():
            model(arch.example_input(1))
    finally:
        for handle in handles:
            handle.remove()
    return total


def checkpoint_problem(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> str | None:
    """What is wrong with a stored global model, or None: names, shapes, dtypes, finiteness."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return f"its tensors are not the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, expected in reference.items():
        got = state[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            return (
                f"{name} is {got.dtype} {tuple(got.shape)}, the model's is "
                f"{expected.dtype} {tuple(expected.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"{name} holds NaN or infinite values"
    return None


def device_kind(profile: dict[str, Any]) -> str:
    """What a device is, from its first runtime: python, browser or executorch."""
    runtimes = profile.get("runtimes") or ["onnx"]
    return {"onnx": "python", "onnx-web": "browser"}.get(str(runtimes[0]), str(runtimes[0]))


def _json_loads(text: str) -> dict[str, Any]:
    import json

    value = json.loads(text)
    return value if isinstance(value, dict) else {}
