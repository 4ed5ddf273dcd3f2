"""The coordinator's logic, free of HTTP: devices, rounds, uploads, statistics.

``Coordinator`` keeps one round open at a time and moves it along on every
call (``tick``): training -> (deadline, or every selected device answered) ->
aggregation -> sBN statistics query -> evaluation -> finished. The HeteroFL
math comes from ``heterofl_edge`` (strategy, aggregator, sBN combination);
records and tensors go to the ``Store``; time comes from an injected clock.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coordinator.config import CoordinatorConfig, LevelPolicy
from coordinator.errors import Conflict, Forbidden, NotFound, Unauthorized
from coordinator.policy import DeviceProfile, LevelCost, choose_rate
from coordinator.store import Assignment as StoredAssignment
from coordinator.store import Device, RoundRecord, Store
from coordinator.wire import WireError, decode, encode, metadata_json
from heterofl_edge.aggregation import HeteroFLAggregator, validate_update
from heterofl_edge.assignment import Assignment as ModeAssignment
from heterofl_edge.assignment import parse_mode
from heterofl_edge.bn_stats import ChannelMoments, apply_statistics, combine_moments
from heterofl_edge.complexity import measure_complexity
from heterofl_edge.errors import ConfigError, UpdateError
from heterofl_edge.levels import rate_label
from heterofl_edge.models import get_architecture
from heterofl_edge.slicing import extract_submodel_state
from heterofl_edge.strategy import HeteroFLStrategy, MultiStepSchedule, client_seed

__all__ = ["Coordinator"]

Clock = Callable[[], float]


class Coordinator:
    def __init__(self, config: CoordinatorConfig, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock
        self.arch = get_architecture(config.model)
        assignment = (
            None if config.policy is LevelPolicy.profile else ModeAssignment(config.policy.value)
        )
        self.mix = parse_mode(config.mode, assignment)
        if not 0 < config.fraction <= 1:
            raise ConfigError(f"fraction {config.fraction} is outside (0, 1]")
        self.store = Store(config.state_dir)
        self._lock = threading.RLock()
        self._check_state_dir()
        loaded = self.store.load_checkpoint()
        if loaded is None:
            torch.manual_seed(config.seed)
            model = self.arch.build(self.mix.global_rate, self.mix.global_rate)
            self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.store.save_checkpoint(0, self.global_state)
        else:
            self.global_state = loaded[1]
        self._aggregator: HeteroFLAggregator | None = None
        self._resume_round()

    # -- set-up ---------------------------------------------------------------
    def _check_state_dir(self) -> None:
        identity = f"{self.arch.name}|{self.mix.name}|{self.config.policy.value}"
        stored = self.store.get_meta("identity")
        if stored is None:
            self.store.set_meta("identity", identity)
        elif stored != identity:
            raise ConfigError(
                f"state dir {self.config.state_dir} holds a run of {stored.replace('|', ', ')}",
                "use the same --model, --mode and --policy to resume, or a new --state-dir",
            )

    def _resume_round(self) -> None:
        """After a restart: rebuild the open round's aggregator from its accepted uploads."""
        current = self.current_round()
        if current is None or current.state != "training":
            return
        self._aggregator = HeteroFLAggregator(
            self.global_state, self.arch.spec, self.mix.global_rate
        )
        for a in self.store.assignments(current.number):
            if a.status == "uploaded":
                tensors, _ = self.store.load_upload(current.number, "updates", a.device_id)
                self._aggregator.add(tensors, a.rate, a.labels)

    @cached_property
    def level_costs(self) -> list[LevelCost]:
        costs = []
        for rate in self.mix.rates:
            c = measure_complexity(self.arch, rate)
            costs.append(LevelCost(rate, c.flops, 4 * c.parameters))
        return costs

    # -- devices --------------------------------------------------------------
    def register(self, profile_json: object) -> dict[str, Any]:
        profile = DeviceProfile.from_json(profile_json)
        rate = choose_rate(profile, self.level_costs, self.config.level_table)
        device_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(32)
        with self._lock:
            device = self.store.add_device(device_id, token, dict(profile_json), rate, self.clock())  # type: ignore[call-overload]
            self.tick()
        return {
            "device_id": device.id,
            "token": token,
            "level": rate_label(rate) if self.config.policy is LevelPolicy.profile else None,
            "rate": rate if self.config.policy is LevelPolicy.profile else None,
            "policy": self.config.policy.value,
        }

    def authenticate(self, header: str | None) -> Device:
        if not header or not header.startswith("Bearer "):
            raise Unauthorized(
                "missing bearer token", "send 'Authorization: Bearer TOKEN' from registration"
            )
        device = self.store.device_by_token(header.removeprefix("Bearer ").strip())
        if device is None:
            raise Unauthorized("unknown token", "register again to get a token")
        return device

    # -- rounds ---------------------------------------------------------------
    def current_round(self) -> RoundRecord | None:
        rounds = self.store.rounds()
        return rounds[-1] if rounds else None

    def completed_rounds(self) -> int:
        return sum(1 for r in self.store.rounds() if r.state in ("finished", "failed"))

    def tick(self) -> None:
        """Advance the round state machine to the present."""
        with self._lock:
            now = self.clock()
            current = self.current_round()
            if current is None or current.state in ("finished", "failed"):
                self._maybe_open_round(now)
            elif current.state == "training":
                self._maybe_close_training(current, now)
            elif current.state == "statistics":
                self._maybe_close_statistics(current, now)

    def _maybe_open_round(self, now: float) -> None:
        devices = self.store.devices()
        number = len(self.store.rounds()) + 1
        if number > self.config.rounds or len(devices) < max(1, self.config.min_devices):
            return
        schedule = MultiStepSchedule(self.config.lr, self.config.milestones, self.config.lr_factor)
        strategy = HeteroFLStrategy(
            self.arch.spec, self.mix, len(devices), self.config.fraction, schedule, self.config.seed
        )
        plan = strategy.configure_round(number)
        chosen = []
        for task in plan.tasks:
            device = devices[task.client_id]
            rate = device.rate if self.config.policy is LevelPolicy.profile else task.rate
            chosen.append((device.id, rate))
        record = RoundRecord(
            number, "training", plan.lr, now, now + self.config.round_seconds, None, None, {}
        )
        self.store.add_round(record, chosen)
        self._aggregator = HeteroFLAggregator(
            self.global_state, self.arch.spec, self.mix.global_rate
        )

    def _maybe_close_training(self, current: RoundRecord, now: float) -> None:
        assignments = self.store.assignments(current.number)
        answered = all(a.status != "assigned" for a in assignments)
        if not answered and now < current.deadline:
            return
        for a in assignments:
            if a.status == "assigned":
                self.store.set_assignment(current.number, a.device_id, status="timed_out")
        uploaded = [a for a in assignments if a.status == "uploaded"]
        metrics: dict[str, Any] = {
            "selected": len(assignments),
            "uploads": len(uploaded),
            "timed_out": sum(1 for a in assignments if a.status == "assigned"),
            "levels": _count_levels(a.rate for a in uploaded),
            "train_loss": _mean(a.metrics.get("loss") for a in uploaded if a.metrics),
            "train_accuracy": _mean(a.metrics.get("accuracy") for a in uploaded if a.metrics),
            "train_seconds": now - current.opened_at,
        }
        if len(uploaded) < max(1, self.config.min_uploads) or self._aggregator is None:
            metrics["reason"] = (
                f"{len(uploaded)} uploads, fewer than the quorum {self.config.min_uploads}"
            )
            self.store.update_round(
                current.number, state="failed", finished_at=now, metrics=metrics
            )
            self._aggregator = None
            return
        self.global_state = self._aggregator.finalize()
        self._aggregator = None
        self.store.save_checkpoint(current.number, self.global_state)
        if self.config.statistics_query and self.arch_has_bn:
            for a in uploaded:
                self.store.set_assignment(current.number, a.device_id, stats_status="asked")
            self.store.update_round(
                current.number,
                state="statistics",
                stats_deadline=now + self.config.stats_seconds,
                metrics=metrics,
            )
        else:
            self._finish(current.number, metrics, now)

    @cached_property
    def arch_has_bn(self) -> bool:
        return any(name.endswith("running_mean") for name in self.arch.spec)

    def _maybe_close_statistics(self, current: RoundRecord, now: float) -> None:
        asked = [a for a in self.store.assignments(current.number) if a.stats_status != "none"]
        done = all(a.stats_status == "uploaded" for a in asked)
        if not done and now < (current.stats_deadline or now):
            return
        reports = [
            _moments(self.store.load_upload(current.number, "statistics", a.device_id)[0])
            for a in asked
            if a.stats_status == "uploaded"
        ]
        metrics = dict(current.metrics)
        metrics["statistics_reports"] = len(reports)
        if reports:
            self.global_state = apply_statistics(self.global_state, combine_moments(reports))
            self.store.save_checkpoint(current.number, self.global_state)
        self._finish(current.number, metrics, now)

    def _finish(self, number: int, metrics: dict[str, Any], now: float) -> None:
        metrics.update(self._evaluate())
        self.store.update_round(number, state="finished", finished_at=now, metrics=metrics)
        self._maybe_open_round(now)

    def _evaluate(self) -> dict[str, Any]:
        if self.config.eval_data_dir is None:
            return {}
        from heterofl_edge.training import evaluate

        images, labels = self._test_data
        model = self.arch.build(self.mix.global_rate, self.mix.global_rate)
        model.load_state_dict(self.global_state)
        result = evaluate(model, images, labels)
        return {
            "global_loss": result.loss,
            "global_accuracy": result.accuracy,
            "test_examples": result.num_examples,
        }

    @cached_property
    def _test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        from heterofl_edge.data import load_mnist

        data = load_mnist(self.config.eval_data_dir)
        limit = self.config.eval_examples or len(data.test_labels)
        return data.test_images[:limit], data.test_labels[:limit]

    # -- device calls ---------------------------------------------------------
    def task(self, device: Device) -> dict[str, Any]:
        """What ``device`` should do now: train, statistics, wait or done."""
        self.tick()
        current = self.current_round()
        if current is not None:
            mine = self.store.assignment(current.number, device.id)
            if current.state == "training" and mine and mine.status == "assigned":
                return self._train_task(current, mine.rate, device)
            if current.state == "statistics" and mine and mine.stats_status == "asked":
                return self._statistics_task(current)
        if self.completed_rounds() >= self.config.rounds:
            return {"action": "done", "rounds": self.config.rounds}
        return {"action": "wait", "retry_after": 1.0}

    def _artifact(self, rate: float) -> dict[str, Any]:
        level = rate_label(rate)
        return {
            "model": self.arch.name,
            "level": level,
            "manifest_url": f"/v1/artifacts/{self.arch.name}/{level}/manifest.json",
            "formats": list(self.config.artifact_formats),
        }

    def _train_task(self, current: RoundRecord, rate: float, device: Device) -> dict[str, Any]:
        local = self.config.local
        return {
            "action": "train",
            "round": current.number,
            # the seed of the device's batch order, as the in-process simulation draws it
            "seed": client_seed(self.config.seed, current.number, device.position),
            "level": rate_label(rate),
            "rate": rate,
            "lr": current.lr,
            "hyperparameters": {
                "epochs": local.epochs,
                "batch_size": local.batch_size,
                "momentum": local.momentum,
                "weight_decay": local.weight_decay,
                "clip_grad_norm": local.clip_grad_norm,
            },
            "artifact": self._artifact(rate),
            "weights_url": f"/v1/rounds/{current.number}/weights",
            "upload_url": f"/v1/rounds/{current.number}/update",
            "deadline": current.deadline,
        }

    def _statistics_task(self, current: RoundRecord) -> dict[str, Any]:
        return {
            "action": "statistics",
            "round": current.number,
            "level": rate_label(self.mix.global_rate),
            "rate": self.mix.global_rate,
            "artifact": self._artifact(self.mix.global_rate),
            "weights_url": f"/v1/rounds/{current.number}/weights",
            "upload_url": f"/v1/rounds/{current.number}/statistics",
            "deadline": current.stats_deadline,
        }

    def _round_for(self, number: int) -> RoundRecord:
        record = self.store.round(number)
        if record is None:
            raise NotFound(f"unknown round {number}", "ask /v1/task for your current round")
        return record

    def _assignment_for(self, device: Device, number: int) -> tuple[RoundRecord, StoredAssignment]:
        """Round ``number`` and ``device``'s assignment in it, brought up to date."""
        self.tick()
        record = self._round_for(number)
        mine = self.store.assignment(number, device.id)
        if mine is None:
            raise Forbidden(f"device {device.id} has no assignment in round {number}")
        return record, mine

    def weights(self, device: Device, number: int) -> bytes:
        """The weights ``device`` needs for its task in round ``number``, as safetensors."""
        with self._lock:
            record, mine = self._assignment_for(device, number)
            if record.state == "training" and mine.status == "assigned":
                rate = mine.rate
            elif record.state == "statistics" and mine.stats_status == "asked":
                rate = self.mix.global_rate
            else:
                raise Conflict(
                    f"round {number} has nothing for device {device.id} now",
                    "ask /v1/task what to do",
                )
            state = extract_submodel_state(
                self.global_state, self.arch.spec, rate, self.mix.global_rate
            )
        return encode(state, {"round": str(number), "rate": repr(rate)})

    def upload_update(self, device: Device, number: int, payload: bytes) -> dict[str, Any]:
        """Validate, store and aggregate one trained sub-model; the round may close."""
        with self._lock:
            record, mine = self._assignment_for(device, number)
            if mine.status == "uploaded":
                raise Conflict(f"round {number}: update already received from this device")
            if record.state != "training" or mine.status == "timed_out":
                raise Conflict(f"round {number} is closed: the update came after its deadline")
            tensors, metadata = decode(payload)
            validate_update(tensors, self.arch.spec, mine.rate)
            num_samples = metadata_json(metadata, "num_samples", None)
            labels = metadata_json(metadata, "labels", None)
            metrics = metadata_json(metadata, "metrics", {})
            if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
                raise WireError("metadata 'num_samples' must be a positive integer")
            if labels is not None and (
                not isinstance(labels, list)
                or not all(isinstance(x, int) and 0 <= x < self.arch.num_classes for x in labels)
            ):
                raise WireError(
                    f"metadata 'labels' must list integers in 0..{self.arch.num_classes - 1}"
                )
            if not isinstance(metrics, dict):
                raise WireError("metadata 'metrics' must be a JSON object")
            assert self._aggregator is not None
            self.store.save_upload(number, "updates", device.id, payload)
            self._aggregator.add(tensors, mine.rate, labels)
            self.store.set_assignment(
                number,
                device.id,
                status="uploaded",
                num_samples=num_samples,
                labels=labels,
                metrics=metrics,
            )
            self.tick()
            return {"accepted": True, "round": number}

    def upload_statistics(self, device: Device, number: int, payload: bytes) -> dict[str, Any]:
        """Store one device's sBN statistics for round ``number``."""
        with self._lock:
            record, mine = self._assignment_for(device, number)
            if mine.stats_status == "none":
                raise Forbidden(
                    f"device {device.id} was not asked for statistics in round {number}"
                )
            if mine.stats_status == "uploaded":
                raise Conflict(f"round {number}: statistics already received from this device")
            if record.state != "statistics":
                raise Conflict(f"round {number} no longer takes statistics")
            tensors, _ = decode(payload)
            _check_statistics(tensors, self.global_state)
            self.store.save_upload(number, "statistics", device.id, payload)
            self.store.set_assignment(number, device.id, stats_status="uploaded")
            self.tick()
            return {"accepted": True, "round": number}

    # -- reading --------------------------------------------------------------
    def global_model(self) -> bytes:
        with self._lock:
            return encode(self.global_state, {"completed_rounds": str(self.completed_rounds())})

    def history(self) -> list[dict[str, Any]]:
        self.tick()
        out = []
        for r in self.store.rounds():
            assignments = self.store.assignments(r.number)
            out.append(
                {
                    "round": r.number,
                    "state": r.state,
                    "lr": r.lr,
                    "opened_at": r.opened_at,
                    "deadline": r.deadline,
                    "finished_at": r.finished_at,
                    "metrics": r.metrics,
                    "assignments": [
                        {
                            "device_id": a.device_id,
                            "level": rate_label(a.rate),
                            "status": a.status,
                            "num_samples": a.num_samples,
                            "statistics": a.stats_status,
                            "metrics": a.metrics,
                        }
                        for a in assignments
                    ],
                }
            )
        return out

    def artifact_dir(self) -> Path:
        return self.config.state_dir / "artifacts"


def _count_levels(rates: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for rate in rates:
        counts[rate_label(rate)] = counts.get(rate_label(rate), 0) + 1
    return counts


def _mean(values: Any) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return float(np.mean(numbers)) if numbers else None


def _moments(tensors: dict[str, torch.Tensor]) -> dict[str, ChannelMoments]:
    layers = sorted({name.rsplit(".", 1)[0] for name in tensors})
    return {
        layer: ChannelMoments(
            int(tensors[f"{layer}.count"]), tensors[f"{layer}.mean"], tensors[f"{layer}.var"]
        )
        for layer in layers
    }


def _check_statistics(tensors: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    layers = sorted(
        name.removesuffix(".running_mean") for name in state if name.endswith(".running_mean")
    )
    expected = {f"{layer}.{part}" for layer in layers for part in ("count", "mean", "var")}
    if set(tensors) != expected:
        raise UpdateError(
            "statistics must hold count, mean and var for every sBN layer",
            f"expected names such as {sorted(expected)[:3]}",
        )
    for layer in layers:
        width = state[f"{layer}.running_mean"].shape
        count, mean, var = (tensors[f"{layer}.{p}"] for p in ("count", "mean", "var"))
        if count.numel() != 1 or not float(count) >= 1:
            raise UpdateError(f"{layer}.count must be one positive number")
        for name, tensor in ((f"{layer}.mean", mean), (f"{layer}.var", var)):
            if tensor.dtype != torch.float32 or tensor.shape != width:
                raise UpdateError(f"{name} must be float32 of shape {tuple(width)}")
            if not torch.isfinite(tensor).all():
                raise UpdateError(f"{name} holds NaN or Inf values")
        if (var < 0).any():
            raise UpdateError(f"{layer}.var has negative entries")
