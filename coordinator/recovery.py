"""``coordinator repair``: make a damaged state folder usable without losing what it holds.

The coordinator refuses to start on a folder it cannot trust (``Store`` and
``Coordinator`` say why, and point here). Repair then does, in order:

1. **A lost database** (missing, empty, or without the run's records) while
   checkpoints exist: the old database files are moved aside, and a new one
   continues the run from the latest checkpoint that reads and holds finite
   values (round numbering goes on; devices register again, since their
   tokens were in the lost database).
2. **The open round** (``--discard-open-round``, the default): marked failed,
   its stored results dropped; the model keeps its last checkpoint.
3. **A damaged checkpoint** (unreadable, or NaN/inf values) as the model to
   resume: the run goes back to the latest sound checkpoint before it, and the
   round that wrote the damaged one is marked failed, with the reason.
4. **Damaged artifacts** (a file that no longer matches its manifest's size or
   sha256): moved to ``artifacts/damaged/``, exported again at the next start.

Nothing is deleted: whatever is replaced is moved aside, and each step is
reported in one line.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

from coordinator.artifacts import damage_in
from coordinator.store import StateError, Store

__all__ = ["repair"]

_SUFFIXES = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class _Sound:
    path: Path
    completed_rounds: int
    identity: str | None


def repair(state_dir: Path, discard_open_round: bool = True) -> list[str]:
    """Repair ``state_dir`` as the module docstring says; one line per thing done."""
    database = state_dir / "coordinator.sqlite3"
    checkpoints = sorted((state_dir / "checkpoints").glob("round-*.safetensors"))
    if not database.is_file() and not checkpoints:
        from heterofl_edge.errors import ConfigError

        raise ConfigError(f"{state_dir} holds no coordinator state", "give the --state-dir to fix")
    done: list[str] = []
    try:
        store = Store(state_dir)
    except StateError:
        if not checkpoints:
            raise
        done.append(_rebuild_database(state_dir, checkpoints))
        store = Store(state_dir)
    try:
        if discard_open_round:
            number = store.discard_open_round("discarded by 'coordinator repair'")
            if number is not None:
                done.append(f"round {number} discarded; the run resumes at round {number + 1}")
        done += _restore_sound_checkpoint(store)
    finally:
        store.close()
    done += _move_damaged_artifacts(state_dir / "artifacts")
    return done or ["nothing to repair: the database, the model's checkpoint and the artifacts"]


def _rebuild_database(state_dir: Path, checkpoints: list[Path]) -> str:
    sound = _latest_sound([c for c in checkpoints if c.name.endswith("-final.safetensors")])
    if sound is None:
        raise StateError(
            f"no checkpoint in {state_dir / 'checkpoints'} reads with finite values",
            "restore the folder from a backup, or start with a new --state-dir",
        )
    stamp = time.strftime("%Y%m%dT%H%M%S")
    moved = []
    for suffix in _SUFFIXES:
        path = state_dir / f"coordinator.sqlite3{suffix}"
        if path.exists():
            aside = path.with_name(f"{path.name}.damaged-{stamp}")
            path.rename(aside)
            moved.append(aside.name)
    store = Store(state_dir, recovering=True)
    try:
        if sound.identity is not None:
            store.set_meta("identity", sound.identity)
        pointer = {
            "completed_rounds": sound.completed_rounds,
            "stage": "final",
            "file": sound.path.name,
        }
        store.set_meta("checkpoint", json.dumps(pointer))
        repaired = {"at": time.time(), "database_from": sound.path.name}
        store.set_meta("repaired", json.dumps(repaired))
    finally:
        store.close()
    kept = f" (the old one kept as {', '.join(moved)})" if moved else ""
    return (
        f"new database{kept}: the run continues after round {sound.completed_rounds} from "
        f"{sound.path.name}; devices register again"
    )


def _restore_sound_checkpoint(store: Store) -> list[str]:
    text = store.get_meta("checkpoint")
    if text is None:
        return []
    pointer = json.loads(text)
    current = store.folder / "checkpoints" / str(pointer["file"])
    if _read_sound(current) is not None:
        return []
    earlier = [
        c
        for c in store.checkpoint_files()
        if c.name.endswith("-final.safetensors") and c.name < current.name
    ]
    sound = _latest_sound(earlier)
    if sound is None:
        raise StateError(
            f"checkpoint {current.name} is damaged and no earlier one is sound",
            "restore the folder from a backup, or start with a new --state-dir",
        )
    number = int(current.name.split("-")[1])  # round-000N-STAGE: the round that wrote it
    reason = (
        f"its checkpoint {current.name} was damaged; 'coordinator repair' went back to "
        f"{sound.path.name}"
    )
    store.set_meta("checkpoint", json.dumps({**pointer, "stage": "final", "file": sound.path.name}))
    store.write(
        lambda db: db.execute(
            "UPDATE rounds SET state = 'failed', result = ? WHERE number = ?",
            (json.dumps({"round": number, "state": "failed", "reason": reason}), number),
        )
    )
    return [f"round {number} marked failed: {reason}"]


def _latest_sound(candidates: list[Path]) -> _Sound | None:
    for path in sorted(candidates, reverse=True):
        found = _read_sound(path)
        if found is not None:
            return found
    return None


def _read_sound(path: Path) -> _Sound | None:
    """The checkpoint at ``path`` if it reads and every value is finite, else None."""
    try:
        state = load(path.read_bytes())
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError, ValueError):
        return None
    for tensor in state.values():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return None
    try:
        completed = int(metadata.get("completed_rounds", path.name.split("-")[1]))
    except ValueError:
        return None
    return _Sound(path, completed, metadata.get("identity"))


def _move_damaged_artifacts(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    done = []
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()):
        problem = damage_in(folder)
        if problem is None:
            continue
        into = root / "damaged"
        into.mkdir(exist_ok=True)
        target = into / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        folder.rename(target)
        done.append(
            f"artifacts {folder.name} damaged ({problem}): moved to {target}, "
            "exported again at the next start"
        )
    return done
