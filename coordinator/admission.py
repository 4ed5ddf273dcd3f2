"""Who may register, who may read the operator's views, and how fast registrations come.

Three independent gates, each off or on by configuration:

* **Enrollment token**: devices present it in their registration
  (``enrollment_token``); without it a registration is refused (401
  ``enrollment_required`` / ``bad_enrollment_token``). Browser devices get it
  inside the device link the coordinator prints at start-up (in the URL's
  fragment, which browsers never send to a server, so it is in no access
  log); it never appears on an anonymous page.
* **Operator token**: the device list, the round history and ``/metrics``
  need ``Authorization: Bearer TOKEN`` (401 ``operator_token_required``). The
  live page reads it from its own link's fragment.
* **Registration rate**: a token bucket per client address (burst and refill
  per minute), so that one address cannot flood the registry; refused with
  429 ``too_many_registrations`` and ``Retry-After``.

``TokenSetting`` turns the command line's choice (a token, ``auto`` or
``none``) into a token: ``auto`` makes a random one once and keeps it in the
state folder (mode 0600), so devices' links survive restarts.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import ApiError, ErrorCode
from heterofl_edge.errors import ConfigError

__all__ = ["Admission", "AdmissionConfig", "RateLimiter", "resolve_token"]

TOKENS_FILE = "admission.json"


@dataclass(frozen=True)
class AdmissionConfig:
    enrollment_token: str | None = None  # None: registration is open
    operator_token: str | None = None  # None: the operator's views are public
    registrations_per_minute: float = 60.0  # per client address; 0: no limit
    registration_burst: int = 100  # registrations an address may make at once


class RateLimiter:
    """Token buckets per key (a client address), at most ``max_keys`` of them (LRU)."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        clock: Callable[[], float],
        max_keys: int = 10_000,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float | None:
        """Take one token for ``key``: None if there was one, else seconds until there is."""
        if self.rate <= 0:
            return None
        now = self._clock()
        with self._lock:
            tokens, since = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate)
            wait = None
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        return wait


class Admission:
    def __init__(self, config: AdmissionConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._limiter = RateLimiter(
            config.registrations_per_minute, config.registration_burst, clock
        )

    def admit_registration(self, address: str, presented: str | None) -> None:
        """``ApiError`` unless a registration from ``address`` with ``presented`` may go on."""
        expected = self.config.enrollment_token
        if expected is not None:
            if not presented:
                raise ApiError(
                    ErrorCode.enrollment_required,
                    "this coordinator admits devices with its enrollment token only",
                    "open the device link the coordinator printed at start-up, or pass "
                    "--enrollment-token to 'heterofl-edge device'",
                )
            if not _same(presented, expected):
                raise ApiError(
                    ErrorCode.bad_enrollment_token,
                    "the enrollment token is not this coordinator's",
                    "use the device link the coordinator printed at its latest start-up",
                )
        wait = self._limiter.take(address)
        if wait is not None:
            raise ApiError(
                ErrorCode.too_many_registrations,
                f"too many registrations from {address}: the limit is "
                f"{self.config.registrations_per_minute:g} a minute",
                f"retry in {math.ceil(wait)} s",
                retry_after=math.ceil(wait),
            )

    def check_operator(self, authorization: str | None) -> None:
        """``ApiError`` unless the operator token is off or ``authorization`` carries it."""
        expected = self.config.operator_token
        if expected is None:
            return
        presented = (authorization or "").removeprefix("Bearer ").strip()
        if not presented or not _same(presented, expected):
            raise ApiError(
                ErrorCode.operator_token_required,
                "this view needs the coordinator's operator token",
                "open the live-page link the coordinator printed at start-up, or send "
                "'Authorization: Bearer TOKEN'",
            )


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def resolve_token(choice: str, kind: str, state_dir: Path) -> str | None:
    """The token that ``choice`` names: ``none`` -> None, ``auto`` -> one kept in ``state_dir``.

    Anything else is the token itself (at least 16 characters, so that it cannot be
    guessed by trying). ``kind`` is ``enrollment`` or ``operator``.
    """
    value = choice.strip()
    if value.lower() == "none":
        return None
    if value.lower() != "auto":
        if len(value) < 16 or any(c.isspace() for c in value):
            raise ConfigError(
                f"the {kind} token must be at least 16 characters without spaces",
                f"use --{kind}-token auto to have one made and kept in the state folder",
            )
        return value
    path = state_dir / TOKENS_FILE
    kept: dict[str, str] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path} cannot be read ({exc})", f"delete it to make new tokens ({kind})"
            ) from None
        if isinstance(loaded, dict):
            kept = {str(k): str(v) for k, v in loaded.items()}
    if kind not in kept:
        kept[kind] = secrets.token_urlsafe(24)
        state_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(kept, handle)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    return kept[kind]
