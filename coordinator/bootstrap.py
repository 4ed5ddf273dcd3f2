"""Start-up I/O: open the state folder, check what it holds, load what the run serves.

``open_state`` does everything a coordinator reads or writes before it can
serve, and refuses (``StateError`` or ``ConfigError``, each with the way out)
a folder it cannot trust: another run's, a damaged checkpoint, stored results
that no longer pass the checks. A fresh folder gets the initial checkpoint.
Nothing here runs once the coordinator serves; ``coordinator.runtime``
assembles the parts from what this returns.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.buffered_journal import BufferedRecords
from coordinator.config import CoordinatorConfig
from coordinator.demo_data import DemoData
from coordinator.errors import ApiError, ErrorCode
from coordinator.intake import parse_statistics, parse_update
from coordinator.store import StateError, Store
from heterofl_edge.engine import Phase
from heterofl_edge.errors import ConfigError
from heterofl_edge.models import Architecture
from heterofl_edge.report import atomic_write_bytes

__all__ = ["OpenedState", "checkpoint_problem", "open_state", "sbn_widths"]

State = dict[str, torch.Tensor]
RUN_ID_FILE = "run-id"  # beside the database: 'coordinator repair' keeps it, a new folder has none


@dataclass(frozen=True)
class OpenedState:
    store: Store
    demo_data: DemoData | None
    run_id: str  # which run this folder holds; devices with a --state-dir check it


def open_state(config: CoordinatorConfig, arch: Architecture) -> OpenedState:
    """The run's state folder, opened and checked; its demo data loaded (if asked for)."""
    store = Store(config.state_dir)  # StateError: a lost database, another format
    try:
        _check_identity(store, config, arch)
        _ensure_checkpoint(store, config, arch)
        _check_open_round(store, config, arch)
        run_id = _run_id(config.state_dir)
        demo = (
            None
            if config.demo_data_dir is None
            else DemoData(config.demo_data_dir, config.data_name, arch)
        )
    except BaseException:
        store.close()
        raise
    return OpenedState(store, demo, run_id)


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


def sbn_widths(arch: Architecture, global_rate: float) -> dict[str, int]:
    """Channels of every sBN layer of the global model (empty for models without sBN)."""
    return {
        name.removesuffix(".running_mean"): rule.dims[0].size(global_rate)
        for name, rule in arch.spec.items()
        if name.endswith(".running_mean")
    }


def _check_identity(store: Store, config: CoordinatorConfig, arch: Architecture) -> None:
    identity = f"{arch.name}|{config.level_mix.name}|{config.policy_name}"
    if config.buffered:  # versions, not rounds: a synchronous run's state cannot continue
        identity += "|buffered"
    stored = store.get_meta("identity")
    if stored is None:
        store.set_meta("identity", identity)
    elif stored != identity:
        raise ConfigError(
            f"state dir {config.state_dir} holds a run of {stored.replace('|', ', ')}",
            "use the same --model, --mode, --policy and --aggregation to resume, or a new "
            "--state-dir",
        )


def _ensure_checkpoint(store: Store, config: CoordinatorConfig, arch: Architecture) -> None:
    """Write the initial model into a fresh folder; check the model to resume otherwise."""
    global_rate = config.level_mix.global_rate
    torch.manual_seed(config.seed)
    model = arch.build(global_rate, global_rate)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    found = store.checkpoint()
    if found is None:
        store.point_at(store.write_checkpoint(0, "final", initial))
        return
    pointer, state = found
    problem = checkpoint_problem(state, initial)
    if problem is not None:
        raise StateError(
            f"checkpoint {pointer.file} in {config.state_dir} cannot be served: {problem}",
            "run 'heterofl-edge coordinator repair --state-dir "
            f"{config.state_dir}' to go back to the latest sound checkpoint",
        )


def checkpoint_problem(state: State, reference: State) -> str | None:
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


def _check_open_round(store: Store, config: CoordinatorConfig, arch: Architecture) -> None:
    """Refuse stored results of the open round that no longer pass the checks.

    Results are checked on the request path before they are stored and trusted
    from their record afterwards; only here, at start-up, could a record have
    been damaged (an older defect, a disk) since. A secure run's open round is
    abandoned whatever it holds, so nothing of it is checked.
    """
    if config.buffered:
        _check_unfolded_updates(store, config, arch)
    row = store.open_round_row()
    if row is None:
        return
    if config.secure_aggregation:
        # Masked vectors, uniform mod 2^32: nothing in them to check. The engine abandons
        # a secure round it finds open (its keys died with the last process) and folds none.
        return
    number = int(row["number"])
    widths = sbn_widths(arch, config.level_mix.global_rate)
    trained = {t.device_id: t.num_samples for t in store.tasks(number, Phase.training)}
    held = {d.id: d.profile.get("num_examples") for d in store.devices()}
    # Buffered: an open version's training rows are updates already folded into it
    # (their bytes dropped); the unfolded ones were checked above.
    phases = (Phase.statistics,) if config.buffered else (Phase.training, Phase.statistics)
    for phase in phases:
        for task in store.uploaded(number, phase):
            payload = store.payload(number, phase, task.device_id)
            try:
                if payload is None:
                    raise ApiError(ErrorCode.bad_payload, "its bytes are missing")
                if phase is Phase.training:
                    parse_update(payload, arch.spec, task.rate, arch.num_classes)
                else:  # as the task board asked: what it trained on, else what it holds
                    expected = trained.get(task.device_id) or held.get(task.device_id) or 0
                    parse_statistics(payload, widths, int(expected))
            except ApiError as exc:
                raise StateError(
                    f"round {number} holds a stored {phase.value} result of device "
                    f"{task.device_id} that does not pass the checks ({exc.message})",
                    f"run 'heterofl-edge coordinator repair --state-dir "
                    f"{config.state_dir}' to discard the open round, then start again",
                ) from None


def _check_unfolded_updates(store: Store, config: CoordinatorConfig, arch: Architecture) -> None:
    """Buffered: refuse acknowledged updates not yet folded whose stored bytes fail the checks.

    They are what a restart re-folds (``coordinator.buffered_journal``), from
    any version a task started from.
    """
    records = BufferedRecords(store)
    for _, task in records.arrivals_after(records.consumed()):
        payload = store.payload(task.round, Phase.training, task.device_id)
        try:
            if payload is None:
                raise ApiError(ErrorCode.bad_payload, "its bytes are missing")
            parse_update(payload, arch.spec, task.rate, arch.num_classes)
        except ApiError as exc:
            raise StateError(
                f"the acknowledged update of device {task.device_id} from version "
                f"{task.round - 1} does not pass the checks ({exc.message})",
                f"restore the state folder {config.state_dir} from a backup, or start a new "
                "--state-dir",
            ) from None
