"""The devices the coordinator knows: tokens, heartbeats, liveness.

Registration is written to the store; everything that changes on every
request (last seen, bytes) lives in memory only, so that a poll costs a
dictionary lookup. Every authenticated request is a heartbeat. A device
silent for longer than the timeout is offline: it is never selected, and a
round does not wait for it. After a restart every device counts as seen at
start-up, so devices get one timeout to come back.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.errors import ApiError, ErrorCode
from coordinator.store import Store, hash_token

__all__ = ["Device", "DeviceRegistry"]


@dataclass
class Device:
    id: str
    position: int
    token_sha256: str
    profile: dict[str, Any]
    rate: float  # its level under the profile policy (updated when it is re-leveled)
    registered_at: float
    last_seen: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


class DeviceRegistry:
    def __init__(self, store: Store, clock: Callable[[], float], timeout_seconds: float) -> None:
        self._store = store
        self._clock = clock
        self.timeout_seconds = timeout_seconds
        self._lock = threading.Lock()  # registration only; reads take no lock
        now = clock()
        self._by_id: dict[str, Device] = {}
        self._by_token: dict[str, Device] = {}
        for row in store.devices():
            device = Device(
                row.id,
                row.position,
                row.token_sha256,
                row.profile,
                row.rate,
                row.registered_at,
                now,
            )
            self._by_id[device.id] = device
            self._by_token[device.token_sha256] = device

    def register(self, profile: dict[str, Any], rate: float) -> tuple[Device, str]:
        """A new device with its token (shown once; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        device_id = secrets.token_hex(8)
        now = self._clock()
        with self._lock:
            row = self._store.add_device(device_id, token, profile, rate, now)
            device = Device(row.id, row.position, row.token_sha256, profile, rate, now, now)
            self._by_id[device.id] = device
            self._by_token[device.token_sha256] = device
        return device, token

    def authenticate(self, header: str | None) -> Device:
        """The device whose bearer token ``header`` carries; the call counts as a heartbeat."""
        if not header or not header.startswith("Bearer "):
            raise ApiError(
                ErrorCode.missing_token,
                "missing bearer token",
                "send 'Authorization: Bearer TOKEN' with the token from registration",
            )
        device = self._by_token.get(hash_token(header.removeprefix("Bearer ").strip()))
        if device is None:
            raise ApiError(ErrorCode.unknown_token, "unknown token", "register again")
        device.last_seen = self._clock()
        return device

    def get(self, device_id: str) -> Device | None:
        return self._by_id.get(device_id)

    def all(self) -> list[Device]:
        return sorted(self._by_id.values(), key=lambda d: d.position)

    def is_silent(self, device: Device, now: float | None = None) -> bool:
        return (self._clock() if now is None else now) - device.last_seen > self.timeout_seconds

    def live(self) -> list[Device]:
        now = self._clock()
        return [d for d in self.all() if not self.is_silent(d, now)]

    def __len__(self) -> int:
        return len(self._by_id)

    def set_rates(self, rates: dict[str, float]) -> None:
        """New profile levels after re-leveling, in memory and in the store."""
        for device_id, rate in rates.items():
            if device_id in self._by_id:
                self._by_id[device_id].rate = rate
        self._store.set_device_rates(rates)
