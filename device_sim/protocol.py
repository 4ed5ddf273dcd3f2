"""The device side of the coordinator's HTTP protocol (requests, no torch).

Every call retries with jittered exponential back-off (``device_sim.backoff``)
while the coordinator is unreachable, restarting or at fault (connection
errors, timeouts, 5xx, 408), and after a 429 as long as its Retry-After says;
a streak of retries is logged twice, when it starts and when the coordinator
is back, and ends with ``CoordinatorUnreachable`` once it outlasts its budget.
A refused token raises ``TokenRefused``; other 4xx replies raise
``ProtocolError`` carrying the reply's machine-readable ``code``, which is
what callers decide on. Artifacts are cached on disk and checked by sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from safetensors.numpy import save

from device_sim.backoff import Backoff
from heterofl_edge.encoding import Decoded, EncodingError, decode_payload
from heterofl_edge.errors import HeteroFLError
from heterofl_edge.protocol import (
    Accepted,
    DeviceProfile,
    Health,
    Registered,
    TaskReply,
    UploadMetadata,
    parse_task,
)

__all__ = [
    "BACKOFF_CAP_SECONDS",
    "DEFAULT_UNREACHABLE_SECONDS",
    "CoordinatorClient",
    "CoordinatorUnreachable",
    "ProtocolError",
    "TokenRefused",
]

# How long a device (and the fleet command) rides out an unreachable coordinator: a restart,
# even one that exports artifacts again, takes minutes, not a quarter of an hour.
DEFAULT_UNREACHABLE_SECONDS = 900.0
# The longest wait between two tries: a restarted coordinator hears from every device within
# this, well inside its --device-timeout (30 s), and an absent one gets a try every 5 s on
# average from each device.
BACKOFF_CAP_SECONDS = 10.0


class ProtocolError(HeteroFLError):
    """The coordinator refused a request (a 4xx reply); ``code`` says why."""

    code = "unreachable"


class TokenRefused(ProtocolError):
    """The coordinator does not know this device's token (401)."""

    code = "unknown_token"


class CoordinatorUnreachable(ProtocolError):
    """The coordinator stayed unreachable (or at fault) longer than the retry budget."""

    code = "unreachable"


class CoordinatorClient:
    def __init__(
        self,
        base_url: str,
        cache_dir: Path,
        retry_seconds: float = DEFAULT_UNREACHABLE_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        ready_seconds: float = 1800.0,
        bandwidth_mbps: float | None = None,
        ca_cert: Path | None = None,
        enrollment_token: str | None = None,
        log: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        backoff_cap: float = BACKOFF_CAP_SECONDS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = cache_dir
        self.retry_seconds = retry_seconds  # how long to ride out an unreachable coordinator
        self.ready_seconds = ready_seconds  # how long to wait while the coordinator starts up
        self._sleep = sleep
        self._session = requests.Session()
        self._beats = requests.Session()  # heartbeats come from another thread
        if ca_cert is not None:  # a coordinator with a self-signed certificate
            self._session.verify = self._beats.verify = str(ca_cert)
        self.enrollment_token = enrollment_token
        self.token: str | None = None
        self.bandwidth_mbps = bandwidth_mbps  # a simulated link: sleep as long as the bytes take
        self.bytes_sent = 0
        self.bytes_received = 0
        self._log = log  # the two lines of a retry streak; None: silent
        self._rng = rng if rng is not None else random.Random()
        self.backoff_cap = backoff_cap

    def _say(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        reply = self._send(method, path, headers, kwargs)
        self._account(len(kwargs.get("data") or b""), len(reply.content))
        if reply.status_code == 401:
            code, message = _error(reply)
            raise TokenRefused(message, "register again", code=code)
        if reply.status_code >= 400:
            code, message = _error(reply)
            raise ProtocolError(f"HTTP {reply.status_code}: {message}", _hint(reply), code=code)
        return reply

    def _send(
        self, method: str, path: str, headers: dict[str, str], kwargs: dict[str, Any]
    ) -> requests.Response:
        """One request, retried with jittered back-off through connection errors and 5xx.

        A coordinator that is still building its artifacts (503 ``not_ready``) is
        waited for up to ``ready_seconds``; anything else up to ``retry_seconds``,
        then ``CoordinatorUnreachable``. A streak of retries logs one line when it
        starts and one when the coordinator answers again.
        """
        backoff = Backoff(cap=self.backoff_cap, rng=self._rng)
        waited = 0.0
        streak: str | None = None  # why the coordinator is unavailable, once it is
        while True:
            budget = self.retry_seconds
            try:
                reply = self._session.request(
                    method, self.base_url + path, headers=headers, timeout=120, **kwargs
                )
                if reply.status_code < 500 and reply.status_code not in (408, 429):
                    if streak is not None:
                        self._say(f"coordinator back after {waited:.0f} s")
                    return reply
                code = _error(reply)[0]
                if code == "not_ready":
                    budget = self.ready_seconds
                detail = f"HTTP {reply.status_code} {code}"
                asked = _retry_after(reply)
            except requests.exceptions.SSLError as exc:
                raise ProtocolError(
                    f"the coordinator's TLS certificate is not trusted ({exc})",
                    "pass --ca-cert FILE with the coordinator's certificate (a self-signed one), "
                    "or set REQUESTS_CA_BUNDLE",
                ) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                detail, asked = _reason(exc), None
            if waited >= budget:
                raise CoordinatorUnreachable(
                    f"coordinator at {self.base_url} unreachable for {waited:.0f} s ({detail})",
                    "check that 'heterofl-edge coordinator serve' runs and the URL is right",
                )
            if streak is None:
                streak = detail
                self._say(
                    f"coordinator unavailable ({detail}); retrying with back-off "
                    f"(at most {self.backoff_cap:g} s apart)"
                )
            pause = backoff.next() if asked is None else min(asked, 60.0)
            self._sleep(pause)
            waited += pause

    def _account(self, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        if self.bandwidth_mbps:
            self._sleep((sent + received) * 8 / (self.bandwidth_mbps * 1e6))

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/v1/health").json())

    def register(self, profile: DeviceProfile) -> Registered:
        if self.enrollment_token:
            profile = profile.model_copy(update={"enrollment_token": self.enrollment_token})
        body = profile.model_dump(mode="json", exclude_none=True)
        reply = Registered.model_validate(self._request("POST", "/v1/devices", json=body).json())
        self.token = reply.token
        return reply

    def task(self, default_wait: float = 2.0) -> TaskReply:
        """What to do now; an action this device does not know reads as a wait."""
        return parse_task(self._request("GET", "/v1/task").json(), default_wait)

    def heartbeat(self) -> None:
        """Tell the coordinator this device is alive (safe to call from another thread)."""
        if not self.token:
            return
        with contextlib.suppress(requests.RequestException):
            self._beats.post(
                f"{self.base_url}/v1/heartbeat",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=10,
            )

    def tensors(self, path: str) -> Decoded:
        """GET weights: float32 arrays whatever their encoding (the payload's metadata says)."""
        reply = self._request("GET", path)
        try:
            return decode_payload(reply.content)
        except EncodingError as exc:
            raise ProtocolError(
                f"the weights from {path} do not decode: {exc.message}",
                "the coordinator sent a damaged payload; retry",
                code=exc.code,
            ) from None

    def upload(
        self, path: str, tensors: dict[str, np.ndarray], metadata: UploadMetadata | None
    ) -> Accepted:
        """POST a result as float32: a training upload's metadata, or none (sBN statistics)."""
        body = save(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()},
            metadata=metadata.to_metadata() if metadata is not None else {},
        )
        return self.send(path, body)

    def send(self, path: str, body: bytes) -> Accepted:
        """POST a result already encoded (``heterofl_edge.encoding``)."""
        return Accepted.model_validate(self._request("POST", path, data=body).json())

    def answer(self, path: str, body: dict[str, Any]) -> Accepted:
        """POST a secure aggregation stage's answer (JSON)."""
        return Accepted.model_validate(self._request("POST", path, json=body).json())

    def artifact(self, manifest_url: str, fmt: str) -> Path:
        """The level's artifact folder in the cache, downloaded and sha256-checked as needed."""
        manifest_bytes = self._request("GET", manifest_url).content
        manifest = json.loads(manifest_bytes)
        folder = self.cache_dir / f"{manifest['model']}-{manifest['level']}"
        base = manifest_url.rsplit("/", 1)[0]
        for name, meta in manifest["files"].items():
            if not name.startswith(f"{fmt}/"):
                continue
            target = folder / name
            if target.is_file() and _sha256(target.read_bytes()) == meta["sha256"]:
                continue
            payload = self._request("GET", f"{base}/{name}").content
            if _sha256(payload) != meta["sha256"]:
                raise ProtocolError(
                    f"artifact {name} failed its sha256 check", "the download was damaged; retry"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(target.suffix + ".part")
            tmp.write_bytes(payload)
            tmp.replace(target)
        (folder / "manifest.json").write_bytes(manifest_bytes)
        return folder


def _retry_after(reply: requests.Response) -> float | None:
    """The reply's Retry-After in seconds (the delta form), if it has a usable one."""
    try:
        seconds = float(reply.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86_400 else None


def _reason(error: Exception) -> str:
    """A connection error in a few words (requests' own text runs to hundreds of characters)."""
    text = str(error)
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(error, requests.Timeout):
        return "timed out"
    return text[:120]


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _hint(reply: requests.Response) -> str:
    """An error reply's ``hint`` (what to do about it), or ''."""
    try:
        body = reply.json()
    except ValueError:
        return ""
    return str(body.get("hint") or "")[:500] if isinstance(body, dict) else ""


def _error(reply: requests.Response) -> tuple[str, str]:
    """The (code, message) of an error reply; ('http_STATUS', text) if it is not ours."""
    try:
        body = reply.json()
    except ValueError:
        return f"http_{reply.status_code}", reply.text[:200]
    if not isinstance(body, dict):
        return f"http_{reply.status_code}", str(body)[:200]
    return str(body.get("code", f"http_{reply.status_code}")), str(body.get("message", body))
