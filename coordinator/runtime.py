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
import threading
import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch

from coordinator.admission import Admission
from coordinator.artifacts import Artifacts, ExportStopped
from coordinator.board import TaskBoard, TaskSettings, Waker, encode_state
from coordinator.bootstrap import OpenedState, open_state
from coordinator.buffered_board import BufferedBoard
from coordinator.buffered_journal import BufferedRecords, BufferedStoreJournal
from coordinator.config import CoordinatorConfig
from coordinator.errors import ApiError, ErrorCode
from coordinator.evaluation import HeldOutEvaluation
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
from coordinator.views import ReadViews
from heterofl_edge.complexity import measure_complexity
from heterofl_edge.engine import RoundEngine, RoundResult, Stopped
from heterofl_edge.federation import build_engine
from heterofl_edge.levels import rate_label
from heterofl_edge.models import Architecture, get_architecture
from heterofl_edge.protocol import Registered, Runtime

__all__ = ["Clock", "Coordinator"]

log = logging.getLogger("heterofl_edge.coordinator")

Clock = Callable[[], float]


class Coordinator:
    """The running coordinator; ``open`` it (start-up I/O), then ``start`` its worker."""

    @classmethod
    def open(cls, config: CoordinatorConfig, clock: Clock = time.time) -> Coordinator:
        """Open and check the state folder (``coordinator.bootstrap``), then assemble."""
        arch = get_architecture(config.model)
        opened = open_state(config, arch)
        try:
            return cls(config, arch, opened, clock)
        except BaseException:  # refused while assembling (e.g. the open round's encodings)
            opened.store.close()
            raise

    def __init__(
        self,
        config: CoordinatorConfig,
        arch: Architecture,
        opened: OpenedState,
        clock: Clock = time.time,
    ) -> None:
        self.config = config  # validated in its constructor
        self.clock = clock
        self.arch = arch
        self.mix = config.level_mix
        self.store = opened.store
        self.demo_data = opened.demo_data
        self.run_id = opened.run_id
        self.metrics = CoordinatorMetrics()
        self.admission = Admission(config.admission, clock)
        self.registry = DeviceRegistry(self.store, clock, config.device_timeout)
        self.waker = Waker()
        local = config.local_training
        board_settings = (
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
        )

        def on_result(kind: str, size: int) -> None:
            self.metrics.uploads.labels(kind, "accepted").inc()

        board_options: dict[str, Any] = dict(
            on_result=on_result,
            plan=config.encodings,
            run_seed=config.seed,
            on_transfer=self.metrics.count_payload,
        )

        self.buffered_records: BufferedRecords | None = None
        self.board: TaskBoard
        if config.buffered:  # FedBuff: every device on its own task (coordinator/buffered_board)
            self.buffered_records = BufferedRecords(self.store)
            self.board = BufferedBoard(
                *board_settings,
                **board_options,
                records=self.buffered_records,
                max_staleness=config.max_staleness,
                task_seconds=config.round_seconds,
                submodel=config.submodel,
            )
        else:
            self.board = TaskBoard(*board_settings, **board_options)
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
        self.problem: str | None = None
        self._model_bytes = b""
        self._completed = 0
        self.journal: StoreJournal | BufferedStoreJournal
        if self.buffered_records is not None:
            self.journal = BufferedStoreJournal(
                self.buffered_records,
                self.policy,
                self._round_finished,
                config.submodel,
                config.max_staleness,
            )
        else:
            self.journal = StoreJournal(
                self.store, self.policy, self._round_finished, config.submodel
            )
        self.engine = self._make_engine()
        self._publish_model(self.engine.global_state, self.engine.completed)
        self.views = ReadViews(
            config,
            self.arch.name,
            self.run_id,
            self.store,
            self.registry,
            self.board,
            self.artifacts,
            self.demo_data is not None,
            clock,
            lambda: self._completed,
            lambda: self.problem,
            self._privacy,
        )
        self.metrics.watch_devices(self.views.device_counts)
        self._worker: threading.Thread | None = None
        self.activity = "starting"  # what the worker is doing, for the log when it stops
        self._announced = False

    def _make_engine(self) -> RoundEngine:
        engine = build_engine(
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
        self.board.privacy = engine.strategy.privacy  # tasks of a private run say so
        return engine

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
                        self.board.finish(self.engine.completed)
                        if self.engine.exhausted is not None:
                            self.problem = f"stopped early: {self.engine.exhausted}"
                            log.warning("done early: %s", self.engine.exhausted)
                        else:
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

    def settle(self, timeout: float = 600.0) -> bool:
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
        plan = self.config.encodings
        log.info(
            "ready: levels %s served; %d of %d rounds done; round %d opens once %d devices "
            "are live (%d registered); weights down in %s, results up in %s%s",
            levels,
            self.engine.completed,
            self.config.total_rounds,
            self.engine.completed + 1,
            self.config.min_devices if self.engine.completed == 0 else self.config.min_uploads,
            len(self.registry),
            plan.download,
            plan.upload,
            ", with error feedback" if plan.error_feedback else "",
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
        if result.privacy is not None:
            self.metrics.dp_epsilon.set(result.privacy["epsilon"])
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
        if result.privacy is not None:
            log.info(
                "round %d: privacy spent so far epsilon %.4g at delta %g",
                result.round,
                result.privacy["epsilon"],
                result.privacy["delta"],
                extra={"round": result.round},
            )

    def _privacy(self) -> dict[str, Any] | None:
        """A private run's budget: spent so far, its settings, and why it stopped (if it did)."""
        plan = self.engine.strategy.privacy
        if plan is None:
            return None
        return {
            "epsilon": plan.epsilon(),
            "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier,
            "clip": plan.clip,
            "placement": plan.placement.value,
            "max_epsilon": plan.max_epsilon,
            "rounds_released": len(plan.releases),
            "stopped": self.engine.exhausted,
        }

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

        ``ApiError`` otherwise: another mode, another format, too little memory, or a
        device that cannot mask its uploads in a run with secure aggregation
        (``secure_aggregation_unsupported``: it is never sent a task in the clear).
        """
        if self.config.secure_aggregation and not profile.get("secure_aggregation"):
            raise ApiError(
                ErrorCode.secure_aggregation_unsupported,
                "this coordinator runs secure aggregation; the device does not mask its uploads",
                "use a device that speaks it (the Python device does), or a run without "
                "--secure-aggregation",
            )
        if self.config.secure_int8 and "int8" not in (profile.get("encodings") or ()):
            raise ApiError(
                ErrorCode.secure_aggregation_unsupported,
                "this coordinator's secure uploads are int8 integers; the device did not "
                "declare int8 in its encodings",
                "update the device, or run the coordinator with --upload-encoding fp32",
            )
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


def device_kind(profile: dict[str, Any]) -> str:
    """What a device is, from its first runtime: python, browser or executorch."""
    runtimes = profile.get("runtimes") or ["onnx"]
    return {"onnx": "python", "onnx-web": "browser"}.get(str(runtimes[0]), str(runtimes[0]))


def _json_loads(text: str) -> dict[str, Any]:
    import json

    value = json.loads(text)
    return value if isinstance(value, dict) else {}
