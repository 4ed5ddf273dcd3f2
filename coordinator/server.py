"""Serving the app under waitress, sized for a fleet, with bounded waits for bodies.

* ``connection_limit`` (default 1,000) concurrent connections, polled with
  ``poll()`` rather than ``select()`` (which cannot watch more than 1,024
  sockets), and the open-files limit raised to match;
* a request whose bytes stop arriving (headers or body) is answered
  ``408 request_timeout`` and closed after ``body_timeout`` seconds, so a slow
  or stalled client holds neither a connection nor a thread for long;
* bodies larger than the app's limit are refused by waitress before they are
  buffered, whatever ``Content-Length`` claims.

Waitress closes idle connections but never answers a request it is still
reading; the 408 is the one place this module reaches into waitress's
channel objects (waitress 3.x), so a waitress upgrade touches this file only.
"""

from __future__ import annotations

import json
import resource
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import waitress
from waitress.server import BaseWSGIServer

from heterofl_edge.errors import ConfigError

__all__ = ["ServerLimits", "TlsServer", "make_server", "make_tls_server"]


@dataclass(frozen=True)
class ServerLimits:
    threads: int = 16
    connection_limit: int = 1000
    body_timeout: float = 30.0  # a request that stops arriving for this long gets 408
    idle_timeout: float = 120.0  # an idle keep-alive connection is closed after this
    max_body_bytes: int = 64 * 1024 * 1024


_TIMEOUT_BODY = json.dumps(
    {
        "code": "request_timeout",
        "message": "the request stopped arriving before it was complete",
        "hint": "send the whole request at once; check the network",
    }
).encode()
_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n"
) + _TIMEOUT_BODY


def _maintenance(server: BaseWSGIServer, now: float, body_timeout: float) -> None:
    """Waitress's idle sweep, plus a 408 for requests whose bytes stopped arriving."""
    idle_cutoff = now - server.adj.channel_timeout
    body_cutoff = now - body_timeout
    for channel in list(server.active_channels.values()):
        if channel.requests or channel.will_close or channel.close_when_flushed:
            continue
        partial = channel.request
        if partial is not None and not partial.completed:
            if channel.last_activity < body_cutoff:
                with channel.requests_lock:
                    channel.request = None
                    channel.outbufs[-1].append(_TIMEOUT_REPLY)
                    channel.total_outbufs_len += len(_TIMEOUT_REPLY)
                    channel.close_when_flushed = True
                server.pull_trigger()
        elif channel.last_activity < idle_cutoff:
            channel.will_close = True


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def make_server(app: Any, host: str, port: int, limits: ServerLimits) -> BaseWSGIServer:
    """A waitress server for ``app`` on ``host:port``; call ``.run()`` to serve."""
    _raise_open_files_limit(limits.connection_limit + 256)
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=limits.threads,
        connection_limit=limits.connection_limit,
        backlog=max(1024, limits.connection_limit),
        channel_timeout=int(limits.idle_timeout),
        cleanup_interval=max(1, int(min(limits.body_timeout, limits.idle_timeout) / 4)),
        max_request_body_size=limits.max_body_bytes,
        asyncore_use_poll=True,
        ident="heterofl-edge",
    )
    if not isinstance(server, BaseWSGIServer):  # several sockets: not used here
        raise RuntimeError("expected one listening socket")
    timeout = limits.body_timeout
    server.maintenance = types.MethodType(
        lambda self, now: _maintenance(self, now, timeout), server
    )
    server.next_channel_cleanup = time.time()
    return server


class TlsServer:
    """The app over HTTPS (cheroot with Python's ssl): a phone needs a secure context.

    Waitress speaks no TLS. cheroot (CherryPy's WSGI server) does, with a thread
    pool and its own limits: ``threads`` workers, a ``body_timeout`` socket
    timeout, and ``max_body_bytes``. ``run`` serves until ``close``.
    """

    def __init__(
        self, app: Any, host: str, port: int, cert: Path, key: Path, limits: ServerLimits
    ) -> None:
        from cheroot.ssl.builtin import BuiltinSSLAdapter
        from cheroot.wsgi import Server

        self._server = Server(
            (host, port),
            app,
            numthreads=limits.threads,
            timeout=int(limits.body_timeout),
            request_queue_size=min(limits.connection_limit, 1024),
            accepted_queue_size=limits.connection_limit,
        )
        self._server.max_request_body_size = limits.max_body_bytes
        self._server.ssl_adapter = BuiltinSSLAdapter(str(cert), str(key))

    def run(self) -> None:
        self._server.start()

    def close(self) -> None:
        self._server.stop()


def make_tls_server(
    app: Any, host: str, port: int, cert: Path, key: Path, limits: ServerLimits
) -> TlsServer:
    for name, path in (("certificate", cert), ("key", key)):
        if not path.is_file():
            raise ConfigError(
                f"TLS {name} {path} does not exist",
                "make one: openssl req -x509 -newkey rsa:2048 -nodes -days 30 "
                "-keyout key.pem -out cert.pem -subj /CN=laptop.local",
            )
    try:
        return TlsServer(app, host, port, cert, key, limits)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot use the TLS certificate and key: {exc}",
            "give a PEM certificate (--tls-cert) and its unencrypted PEM key (--tls-key)",
        ) from None
