"""A device's registration kept on disk (``--state-dir``), so that a restart resumes it.

The folder holds ``device.json``: the device id and token the coordinator
gave, the coordinator's URL and run id (``GET /v1/health``'s ``run_id``), and
what the registration promised (poll and heartbeat intervals, the largest
level that fits its memory). It is written atomically (a temporary file,
fsync, rename) with mode 0600, since the token is the device's credential;
the token is never logged and never shown in a ``repr``.

Refused, each with one line saying why and what to do: a folder that cannot
be created or written, a folder that is not a device's (it holds other
files), a ``device.json`` that does not parse or that others may read, and a
registration with another coordinator run (``check_run``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from heterofl_edge.errors import ConfigError

__all__ = ["IDENTITY_FILE", "DeviceIdentity", "StateDir", "new_identity"]

IDENTITY_FILE = "device.json"
FORMAT = 1
# What a device's state folder may hold besides its identity: the artifact cache (the
# default --cache under --state-dir) and temporary files of an interrupted write.
_OWN = frozenset({IDENTITY_FILE, "cache"})
_TEMPORARY_PREFIX = f".{IDENTITY_FILE}."


@dataclass(frozen=True)
class DeviceIdentity:
    """One registration: who the device is to which coordinator run, and its settings."""

    device_id: str
    token: str = field(repr=False)  # the device's credential: never logged
    coordinator: str  # the URL it registered with
    run_id: str | None  # the coordinator run's identity (None: a coordinator without one)
    registered_at: float
    poll_seconds: float = 2.0
    heartbeat_seconds: float = 5.0
    max_rate: float | None = None  # the largest rate its memory trains, as the coordinator said
    max_level: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # what registering again would change

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> DeviceIdentity:
        """The identity in ``data``; ``ValueError`` saying what is missing or wrong."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"it is not a format-{FORMAT} device identity")
        known = {k: v for k, v in data.items() if k != "format"}
        for name in ("device_id", "token", "coordinator"):
            if not isinstance(known.get(name), str) or not known[name]:
                raise ValueError(f"its {name!r} is missing")
        try:
            return cls(**known)
        except TypeError as exc:
            raise ValueError(str(exc)) from None


class StateDir:
    """The folder given as ``--state-dir``: checked when opened, then read and written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path / IDENTITY_FILE
        self._check_folder()

    def _check_folder(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"--state-dir {path} is a file, not a folder",
                "give a folder of its own to this device, e.g. /var/lib/heterofl-edge",
            )
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--state-dir {path} cannot be created: {exc.strerror or exc}",
                "give a folder this user may create and write",
            ) from None
        others = sorted(
            p.name
            for p in path.iterdir()
            if p.name not in _OWN and not p.name.startswith(_TEMPORARY_PREFIX)
        )
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            what = "a coordinator's" if "coordinator.sqlite3" in others else "not a device's"
            raise ConfigError(
                f"--state-dir {path} is {what} state folder: it holds {shown}",
                "give this device a folder of its own (empty, or one it wrote before)",
            )
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ConfigError(
                f"--state-dir {path} is not writable: {exc.strerror or exc}",
                "give a folder this user may write (the service's StateDirectory= is)",
            ) from None
        for leftover in path.glob(f"{_TEMPORARY_PREFIX}*"):  # an interrupted write
            leftover.unlink(missing_ok=True)

    def load(self) -> DeviceIdentity | None:
        """The stored registration, or None before the first; ``ConfigError`` if unusable."""
        try:
            mode = self.file.stat().st_mode
        except FileNotFoundError:
            return None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{self.file} holds this device's token and others may read it "
                f"(mode {stat.S_IMODE(mode):04o})",
                f"chmod 600 {self.file}",
            )
        try:
            return DeviceIdentity.from_json(json.loads(self.file.read_text()))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(
                f"{self.file} is not a heterofl-edge device identity ({exc})",
                "remove it to register this device anew, or give another --state-dir",
            ) from None

    def save(self, identity: DeviceIdentity) -> None:
        """Write ``identity`` atomically with mode 0600: the old file or the new, never half."""
        payload = (json.dumps(identity.to_json(), indent=2) + "\n").encode()
        fd, tmp = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=self.path)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_folder(self.path)

    def forget(self) -> None:
        """Drop the stored registration (the next start registers anew)."""
        self.file.unlink(missing_ok=True)
        _fsync_folder(self.path)

    def check_run(self, identity: DeviceIdentity, url: str, run_id: str | None) -> None:
        """``ConfigError`` unless the coordinator at ``url`` runs the run ``identity`` joined.

        The run id decides: a coordinator that moved to another address keeps
        its devices, and another run (a fresh coordinator state folder) behind
        the same address is refused. A coordinator without run ids is taken at
        its URL.
        """
        if identity.run_id is not None and run_id is not None:
            same = identity.run_id == run_id
        else:
            same = identity.coordinator.rstrip("/") == url.rstrip("/")
        if same:
            return
        ran = f"run {identity.run_id}" if identity.run_id else "a coordinator"
        now = f"run {run_id}" if run_id else "a coordinator without a run id"
        raise ConfigError(
            f"--state-dir {self.path} holds device {identity.device_id} of {ran} at "
            f"{identity.coordinator}; {url} serves {now}",
            f"this device belongs to another coordinator: remove {self.file} to register with "
            "this one, or give it another --state-dir",
        )


def new_identity(
    device_id: str,
    token: str,
    coordinator: str,
    run_id: str | None,
    poll_seconds: float,
    heartbeat_seconds: float,
    max_rate: float | None,
    max_level: str | None,
    settings: dict[str, Any],
) -> DeviceIdentity:
    """A registration made now."""
    return DeviceIdentity(
        device_id,
        token,
        coordinator.rstrip("/"),
        run_id,
        time.time(),
        poll_seconds,
        heartbeat_seconds,
        max_rate,
        max_level,
        settings,
    )


def _fsync_folder(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
