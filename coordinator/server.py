"""Serving the app to a fleet without a reverse proxy: no client can lock the others out.

Two servers share one set of limits (``ServerLimits``, each but the body cap a
flag of ``coordinator serve``):

* plain HTTP under waitress (``make_server``, the default): bodies are read by
  one event loop, never by the worker threads, so slow clients cost a socket,
  not a thread;
* HTTPS under cheroot (``make_tls_server``, ``--tls-cert``): a phone needs a
  secure context, and waitress speaks no TLS.

What a client may do (the defaults, and why):

* **request deadline** (``request_timeout``, 15 s): a request's headers must
  arrive within 15 s of its first byte, and the whole request within
  ``request_timeout + Content-Length / min_transfer_rate`` (a chunked body is
  counted at the largest body allowed); a phone's headers take well under a
  second even on 2G, 15 s leaves room for lost packets (TCP retries after 1,
  2 and 4 s);
* **minimum transfer rate** (``min_transfer_rate``, 4,096 bytes/s): after the
  first ``request_timeout`` seconds the request must have arrived at this
  average rate; a request that falls behind is answered ``408
  request_timeout`` and closed. 4 kB/s is GPRS class (EDGE uploads at 12-25
  kB/s): a 6.5 MB level-a conv upload at that rate takes 26 minutes, longer
  than the default 10-minute round, so no device that could finish a round is
  cut off, while one byte every 10 s is cut off after about 15 s;
* **stall** (``body_timeout``, 30 s): a request none of whose bytes arrive for
  this long is answered 408 even if it was fast before; a reply none of whose
  bytes leave for this long is dropped;
* **silent connections** (``silent_connection_timeout``, 10 s): a connection
  that has not sent a byte is closed after 10 s (a device opens a connection
  to send a request at once);
* **idle keep-alive** (``idle_timeout``, 15 s): a connection that has
  completed its requests is kept this long for the next one (devices poll
  every 2 s by default, and heartbeat at most every 5 s);
* **per-address cap** (``connections_per_address``, 64): one client address
  (an IPv6 client's /64) holds at most 64 of the ``connection_limit`` (1,000)
  connections; one more is answered ``503 too_many_connections`` and closed,
  so 16 addresses are needed to fill the server. 64 leaves room for a
  classroom of phones behind one NAT (a browser opens up to 6 connections);
  behind a reverse proxy every client has the proxy's address, so raise it
  to the connection limit there and let the proxy cap its clients (README,
  "Behind a reverse proxy"). ``X-Forwarded-For`` is never trusted: the cap is
  taken at accept, before any header arrives.

Waitress checks these in a sweep every second, so a limit takes effect
within about a second of being passed. Every refusal is JSON ``{"code",
"message", "hint"}``, those the servers write themselves included: 408
``request_timeout``, 413 ``payload_too_large``, 503 ``too_many_connections``,
400 ``invalid_request``.

HTTPS (cheroot) matches all of the above except where threads read: cheroot
reads each request on a worker thread, so a client being read holds one of
the ``threads`` workers (at most ``request_timeout + Content-Length /
min_transfer_rate``). ``threads`` clients sending at the minimum rate can
therefore hold every worker (waitress, which reads on its event loop, has no
such bound), and the TLS handshake (on the worker, bounded by
``request_timeout``) counts towards no deadline. Silent connections hold no
worker: they wait in cheroot's selector. A connection beyond a cap is closed
without a reply (no TLS session exists yet to send one in), and the idle
timeout is rounded up to whole seconds. On an untrusted network, terminate
TLS at a reverse proxy.

This module is the one place that reaches into the servers' internals,
written against waitress 3.0.2 (``HTTPChannel``, ``ErrorTask``, the parser's
``headers_finished`` / ``content_length`` / ``chunked``, the server's
``maintenance`` sweep) and cheroot 11.1.2 (``HTTPConnection.communicate``,
``HTTPRequest.simple_response``, ``HTTPServer.process_conn`` and its
``_connections`` manager): an upgrade of either touches this file only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import resource
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cheroot.errors import FatalSSLAlert
from cheroot.server import HTTPConnection, HTTPRequest
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cheroot.wsgi import Gateway_10
from cheroot.wsgi import Server as WsgiServer
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask
from werkzeug.exceptions import RequestTimeout

from coordinator.errors import ErrorCode
from heterofl_edge.errors import ConfigError

log = logging.getLogger("heterofl_edge.coordinator")

__all__ = [
    "HttpServer",
    "ServerLimits",
    "TlsServer",
    "client_key",
    "make_server",
    "make_tls_server",
    "time_left",
]


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold of the server; the module docstring says why each default.

    Validated here: a bad value is a one-line ``ConfigError`` naming its flag
    (``body_timeout`` is ``--body-timeout``).
    """

    threads: int = 16
    connection_limit: int = 1000
    body_timeout: float = 30.0  # no byte of a request (or its reply) for this long: 408
    idle_timeout: float = 15.0  # a keep-alive connection between requests
    max_body_bytes: int = 64 * 1024 * 1024
    request_timeout: float = 15.0  # headers within this; the body at min_transfer_rate after
    min_transfer_rate: float = 4096.0  # bytes per second
    silent_connection_timeout: float = 10.0  # a connection that has sent nothing
    connections_per_address: int = 64

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            flag = "--" + field.name.replace("_", "-")
            if field.type == "int" and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
            if field.type == "float" and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{flag} must be a positive, finite number, got {value}")

    def request_deadline(self, length: int) -> float:
        """Seconds a request with a ``length``-byte body may take to arrive, headers included."""
        return self.request_timeout + length / self.min_transfer_rate


def time_left(
    limits: ServerLimits, elapsed: float, silent_for: float, received: int, length: int | None
) -> tuple[float, str]:
    """Seconds a request still arriving may take before it is answered 408, and why then.

    ``elapsed``: seconds since its first byte; ``silent_for``: since its last
    byte; ``received``: its bytes so far, headers included; ``length``: its
    declared body length, ``None`` while the headers are incomplete. A result
    of zero or less means now. The request fails on the first of: a stall of
    ``body_timeout``; headers not complete after ``request_timeout``; the whole
    request not complete after ``limits.request_deadline(length)``; fewer bytes
    than ``min_transfer_rate`` per second after the first ``request_timeout``.
    """
    rate = limits.min_transfer_rate
    left = [
        (
            limits.body_timeout - silent_for,
            f"no byte of the request arrived for {limits.body_timeout:g} s",
        )
    ]
    if length is None:
        left.append(
            (
                limits.request_timeout - elapsed,
                f"the request's headers did not arrive within {limits.request_timeout:g} s",
            )
        )
    else:
        deadline = limits.request_deadline(length)
        left.append(
            (
                deadline - elapsed,
                f"the request did not arrive within its deadline ({deadline:g} s for "
                f"{length} bytes)",
            )
        )
        left.append(
            (
                limits.request_timeout + received / rate - elapsed,
                f"the request arrived slower than {rate:g} bytes/s",
            )
        )
    return min(left)


def client_key(host: str) -> str:
    """The address a connection counts against: the IP, an IPv6 client's /64 network.

    One IPv6 host usually holds a whole /64; an IPv4 address mapped into IPv6 is
    the IPv4 address. A host that is not an IP address (a Unix socket) is itself.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _error_body(code: ErrorCode, message: str, hint: str) -> bytes:
    return json.dumps({"code": code.value, "message": message, "hint": hint}).encode()


def _raw_reply(
    status: str, code: ErrorCode, message: str, hint: str, headers: Iterable[str] = ()
) -> bytes:
    """A whole HTTP/1.1 JSON error reply that closes the connection."""
    body = _error_body(code, message, hint)
    head = [
        f"HTTP/1.1 {status}",
        "Content-Type: application/json",
        "Connection: close",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def _timeout_hint(limits: ServerLimits) -> str:
    return (
        f"send the request at once, at least {limits.min_transfer_rate:g} bytes/s after its "
        f"first {limits.request_timeout:g} s; check the network"
    )


def _too_many_reply(limits: ServerLimits) -> bytes:
    return _raw_reply(
        "503 Service Unavailable",
        ErrorCode.too_many_connections,
        f"this address holds {limits.connections_per_address} connections already, the most "
        "one address may",
        "retry shortly; close idle connections (behind a proxy: raise --connections-per-address)",
        ["Retry-After: 5"],
    )


def _server_error(status: int, detail: str, limits: ServerLimits) -> tuple[ErrorCode, str, str]:
    """The JSON code, message and hint for an error the server answers itself."""
    if status == 413:  # cheroot also answers 413 to headers over its limit
        body = f"body too large: the limit is {limits.max_body_bytes} bytes"
        return ErrorCode.payload_too_large, detail if "header" in detail else body, ""
    if status == 408:
        return ErrorCode.request_timeout, detail, _timeout_hint(limits)
    if status == 405:
        return ErrorCode.method_not_allowed, detail, "see /v1/openapi.json"
    if status == 500:
        return ErrorCode.internal_error, detail, "a fault on the server, not your request: retry"
    return ErrorCode.invalid_request, detail, "see /v1/openapi.json"  # 400, 414, 431, 501, 505


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class _AddressBook:
    """Connections per client address, and in all; thread-safe."""

    def __init__(self, limits: ServerLimits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()
        self._total = 0

    def admit(self, client: str) -> bool:
        """Count one more connection from ``client`` unless a cap is reached (then False).

        The total cap is cheroot's only one; waitress stops accepting before it.
        """
        with self._lock:
            if (
                self._open[client] >= self._limits.connections_per_address
                or self._total >= self._limits.connection_limit
            ):
                return False
            self._open[client] += 1
            self._total += 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            self._open[client] -= 1
            self._total -= 1
            if self._open[client] <= 0:
                del self._open[client]

    def count(self, client: str) -> int:
        with self._lock:
            return self._open[client]


# --- plain HTTP: waitress ------------------------------------------------------------------


class _JsonErrorTask(ErrorTask):
    """Waitress's own error replies (400, 413, 431, 501) as JSON with a ``code``."""

    def execute(self) -> None:
        error = self.request.error
        limits = self.channel.server.limits
        code, message, hint = _server_error(
            error.code, f"{error.reason.lower()}: {error.body}", limits
        )
        body = _error_body(code, message, hint)
        self.status = f"{error.code} {error.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    """A waitress connection that knows when its request started and how much has arrived."""

    error_task_class = _JsonErrorTask
    will_close: bool  # waitress's flags, set by the sweep
    request: Any  # the request being read (a waitress parser), or None
    close_when_flushed: bool
    admitted = False  # counted in the server's address book
    heard = False  # any byte received, ever
    started: float | None = None  # first byte of the request being read
    received_bytes = 0  # bytes of the request being read
    last_byte = 0.0

    def __init__(self, server: HttpServer, sock: Any, addr: Any, adj: Any, map: Any = None):
        super().__init__(server, sock, addr, adj, map=map)
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        self.client = client_key(host)
        self.last_byte = self.creation_time
        self.admitted = server.addresses.admit(self.client)
        if not self.admitted:
            self.answer_and_close(_too_many_reply(server.limits))

    def answer_and_close(self, reply: bytes) -> None:
        """Drop the request being read, send ``reply`` and close once it is sent."""
        with self.requests_lock:
            if self.request is not None:
                self.request.close()  # its body buffer, possibly a temporary file
            self.request = None
            self.started = None
            self.outbufs[-1].append(reply)
            self.total_outbufs_len += len(reply)
            self.close_when_flushed = True

    def received(self, data: bytes) -> bool:
        now = time.time()
        before = self.request
        result = bool(super().received(data))
        if data:
            self.heard = True
            self.last_byte = now
            if self.request is None:  # every request in data arrived whole
                self.started = None
            elif self.request is not before or self.started is None:  # a new one began
                self.started = now
                self.received_bytes = len(data)
            else:
                self.received_bytes += len(data)
        return result

    def service(self) -> None:
        super().service()
        if self.request is not None and self.started is not None:
            # a pipelined request waited for the one served: its clock starts now
            self.started = self.last_byte = time.time()
            self.received_bytes = 0

    def del_channel(self, map: Any = None) -> None:
        if self.admitted:
            self.admitted = False
            self.server.addresses.release(self.client)
        super().del_channel(map)

    def sweep(self, now: float, limits: ServerLimits) -> bool:
        """Answer 408 or close this connection if it overstays; True if it was told to."""
        if self.requests or self.will_close or self.close_when_flushed:
            return False  # being served, or closing already
        if self.total_outbufs_len:  # a reply being sent: the reader must keep taking it
            if now - self.last_activity > limits.body_timeout:
                self.will_close = True
                return True
            return False
        partial = self.request
        if partial is not None and not partial.completed and self.started is not None:
            length = None
            if partial.headers_finished:
                length = limits.max_body_bytes if partial.chunked else partial.content_length
            left, why = time_left(
                limits, now - self.started, now - self.last_byte, self.received_bytes, length
            )
            if left > 0:
                return False
            self.answer_and_close(
                _raw_reply(
                    "408 Request Timeout", ErrorCode.request_timeout, why, _timeout_hint(limits)
                )
            )
            return True
        if not self.heard:
            expired = now - self.creation_time > limits.silent_connection_timeout
        else:
            expired = now - max(self.last_activity, self.last_byte) > limits.idle_timeout
        if expired:
            self.will_close = True
        return expired


class HttpServer(TcpWSGIServer):
    """Waitress on one address, with ``ServerLimits`` enforced by a sweep every second.

    ``run`` serves until ``stop`` (from any thread), KeyboardInterrupt or
    SystemExit; ``close`` then closes every connection. ``port`` is the bound port.
    """

    channel_class = _Channel

    def __init__(self, app: Any, limits: ServerLimits, adj: Adjustments) -> None:
        self.limits = limits
        self.addresses = _AddressBook(limits)
        self._stop_requested = threading.Event()
        super().__init__(app, map={}, adj=adj, sockinfo=adj.listen[0])

    @property
    def port(self) -> int:
        return int(self.effective_port)

    def maintenance(self, now: float) -> None:
        touched = False
        for channel in list(self.active_channels.values()):
            touched = channel.sweep(now, self.limits) or touched
        if touched:
            self.pull_trigger()

    def run(self) -> None:
        try:
            while not self._stop_requested.is_set():
                self.asyncore.loop(
                    timeout=self.adj.asyncore_loop_timeout,
                    map=self._map,
                    use_poll=self.adj.asyncore_use_poll,
                    count=1,
                )
        except (SystemExit, KeyboardInterrupt):
            pass
        finally:
            self.task_dispatcher.shutdown()

    def stop(self) -> None:
        """Make ``run`` return soon; safe from any thread."""
        self._stop_requested.set()
        self.pull_trigger()

    def close(self) -> None:
        """Close the listening socket and every connection (after ``run`` has returned)."""
        for channel in list(self.active_channels.values()):
            channel.handle_close()
        super().close()


def make_server(app: Any, host: str, port: int, limits: ServerLimits) -> HttpServer:
    """A waitress server for ``app`` on ``host:port`` (0: any free port); ``.run()`` serves."""
    _raise_open_files_limit(limits.connection_limit + 256)
    adj = Adjustments(
        host=host,
        port=port,
        threads=limits.threads,
        connection_limit=limits.connection_limit,
        backlog=max(1024, limits.connection_limit),
        cleanup_interval=1,  # the sweep that enforces the limits, every second
        # waitress refuses a body of max_request_body_size bytes; the app allows its limit
        max_request_body_size=limits.max_body_bytes + 1,
        asyncore_use_poll=True,  # select() cannot watch more than 1,024 sockets
        ident="heterofl-edge",
    )
    if len(adj.listen) != 1:
        raise ConfigError(
            f"--host {host} names {len(adj.listen)} addresses",
            "give one IP address, e.g. 127.0.0.1 or 0.0.0.0",
        )
    return HttpServer(app, limits, adj)


# --- HTTPS: cheroot ------------------------------------------------------------------------


class _Pace:
    """The clock of one request read by a cheroot worker (see ``time_left``)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.started = self.last_byte = time.time()
        self.received = 0
        self.length: int | None = None
        self.why = ""  # why it was cut off, once it was

    def wait(self) -> tuple[float, str]:
        """Seconds the next read may wait, and why it fails after; ``TimeoutError`` if overdue."""
        now = time.time()
        left, why = time_left(
            self.limits, now - self.started, now - self.last_byte, self.received, self.length
        )
        if left <= 0:
            self.why = why
            raise TimeoutError("timed out")  # the text cheroot takes for a timeout
        return left, why


_PLAIN_HTTP_REPLY = _raw_reply(
    "400 Bad Request",
    ErrorCode.invalid_request,
    "this port speaks HTTPS only",
    "use an https:// address",
)


class _PacedSSLSocket(ssl.SSLSocket):
    """A TLS socket whose reads time out when the request they read falls behind its pace."""

    pace: _Pace | None = None

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        pace = self.pace
        if pace is None:
            return super().recv_into(buffer, nbytes, flags)
        why = ""
        try:
            left, why = pace.wait()
            self.settimeout(left)
            count = super().recv_into(buffer, nbytes, flags)
        except TimeoutError:
            pace.why = pace.why or why
            raise TimeoutError("timed out") from None
        finally:
            self.settimeout(pace.limits.body_timeout)  # for writes: a stalled reader
        pace.received += count
        pace.last_byte = time.time()
        return count


class _PacedInput:
    """``wsgi.input`` that turns a read cut off by the pace into a 408 the app answers."""

    def __init__(self, stream: Any, pace: _Pace) -> None:
        self._stream = stream
        self._pace = pace

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(self._pace.why or "the request stopped arriving")

    def read(self, size: int | None = None) -> bytes:
        try:  # cheroot's body readers take None, not -1, for "all of it"
            return bytes(self._stream.read(None if size is None or size < 0 else size))
        except TimeoutError:
            raise self._timeout() from None

    def readline(self, size: int | None = None) -> bytes:
        try:
            return bytes(self._stream.readline(None if size is None or size < 0 else size))
        except TimeoutError:
            raise self._timeout() from None

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines = []
        while line := self.readline():
            lines.append(line)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        self._stream.close()


class _TlsRequest(HTTPRequest):
    """A request whose pace learns its body length, and whose own errors are JSON."""

    def parse_request(self) -> None:
        super().parse_request()
        pace = getattr(self.conn.socket, "pace", None)
        if self.ready and pace is not None:
            length = self.inheaders.get(b"Content-Length", b"0")
            pace.length = self.server.limits.max_body_bytes if self.chunked_read else int(length)

    def send_headers(self) -> None:
        pace = getattr(self.conn.socket, "pace", None)
        if pace is not None and pace.why:  # a request cut off: never read on after it
            self.close_connection = True
        super().send_headers()

    def simple_response(self, status: Any, msg: Any = "") -> None:
        status = str(status)
        detail = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)
        pace = getattr(self.conn.socket, "pace", None)
        if status.startswith("408") and pace is not None and pace.why:
            detail = pace.why
        code, message, hint = _server_error(
            int(status[:3]), detail or status[4:].lower(), self.server.limits
        )
        body = _error_body(code, message, hint)
        self.close_connection = True
        head = (
            f"{self.server.protocol} {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the client has gone: nothing to tell it
            self.conn.wfile.write(head.encode("latin-1") + body)


class _TlsConnection(HTTPConnection):
    """A connection counted against its address, secured and paced on its worker."""

    RequestHandlerClass = _TlsRequest
    client = ""
    admitted = False
    secured = False

    def communicate(self) -> bool:
        limits: ServerLimits = self.server.limits
        if not self.secured:
            self.socket.settimeout(limits.request_timeout)
            try:
                self.socket.do_handshake()
            except ssl.SSLError as exc:
                if exc.reason == "HTTP_REQUEST":  # plain HTTP: say so, in plain HTTP
                    with contextlib.suppress(OSError):
                        socket.socket.sendall(self.socket, _PLAIN_HTTP_REPLY)
                else:
                    self.server.handshake_failed(str(exc.reason or exc))
                return False
            except (OSError, ValueError):
                return False  # a failed or stalled handshake: close
            self.secured = True
            self.ssl_env = self.server.ssl_adapter.get_environ(self.socket)
        pace = _Pace(limits)
        self.socket.pace = pace
        try:
            return bool(super().communicate()) and not pace.why
        finally:
            self.socket.pace = None

    def close(self) -> None:
        if self.admitted:
            self.admitted = False
            self.server.addresses.release(self.client)
        super().close()


class _TlsAdapter(BuiltinSSLAdapter):
    def __init__(self, cert: str, key: str) -> None:
        super().__init__(cert, key)
        self.context.sslsocket_class = _PacedSSLSocket

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
        """The TLS socket, its handshake left to the worker that first reads from it."""
        try:
            wrapped = self.context.wrap_socket(
                sock, do_handshake_on_connect=False, server_side=True
            )
        except OSError as exc:  # the peer has gone: cheroot drops the connection
            raise FatalSSLAlert(*exc.args) from exc
        return wrapped, {"wsgi.url_scheme": "https", "HTTPS": "on"}


class _TlsGateway(Gateway_10):
    def get_environ(self) -> dict[str, Any]:  # type: ignore[override]  # stub says None
        environ: dict[str, Any] = super().get_environ()
        pace = getattr(self.req.conn.socket, "pace", None)
        if pace is not None:
            environ["wsgi.input"] = _PacedInput(environ["wsgi.input"], pace)
        return environ


class _TlsWsgiServer(WsgiServer):
    ConnectionClass = _TlsConnection

    def handshake_failed(self, reason: str) -> None:
        """Count a failed TLS handshake; log the first of each reason only.

        A browser that has not yet trusted a self-signed certificate aborts
        every connection it opens (``SSLV3_ALERT_CERTIFICATE_UNKNOWN``): one
        line says so, instead of one per connection.
        """
        with self._handshake_lock:
            self.failed_handshakes[reason] += 1
            first = self.failed_handshakes[reason] == 1
        if first:
            log.info(
                "HTTPS: a client refused the TLS handshake (%s); a browser does this until "
                "its user accepts a self-signed certificate. Further failures of this kind "
                "are not logged",
                reason,
            )

    def __init__(self, app: Any, host: str, port: int, limits: ServerLimits) -> None:
        super().__init__(
            (host, port),
            app,
            numthreads=limits.threads,
            timeout=math.ceil(limits.idle_timeout),  # cheroot closes idle connections after it
            request_queue_size=min(limits.connection_limit, 1024),
            accepted_queue_size=limits.connection_limit,
        )
        self.limits = limits
        self.addresses = _AddressBook(limits)
        self.failed_handshakes: Counter[str] = Counter()
        self._handshake_lock = threading.Lock()
        self.gateway = _TlsGateway
        self.keep_alive_conn_limit = limits.connection_limit  # cheroot's default: 10
        self.max_request_body_size = limits.max_body_bytes

    def process_conn(self, conn: _TlsConnection) -> None:
        if conn.admitted:  # a connection with bytes to read: to a worker
            super().process_conn(conn)
            return
        conn.client = client_key(str(conn.remote_addr))
        if not self.addresses.admit(conn.client):
            conn.close()
            return
        conn.admitted = True
        # A new connection waits in the selector until its first bytes arrive. Cheroot
        # closes a waiting connection unused for `timeout` (idle_timeout); a new one is
        # dated back so that it goes after silent_connection_timeout instead.
        self._connections.put(conn)  # type: ignore[attr-defined]  # cheroot's, not in its stub
        conn.last_used = time.time() + self.limits.silent_connection_timeout - self.timeout


class TlsServer:
    """The app over HTTPS (cheroot with Python's ssl): a phone needs a secure context.

    Enforces the same ``ServerLimits`` as waitress, with the differences the
    module docstring lists (a request being read holds a worker thread; a
    connection beyond a cap is closed without a reply). A new connection waits
    in cheroot's selector, not on a worker, until its first bytes arrive, and
    its TLS handshake runs on the worker (cheroot runs it on the thread that
    accepts, where one silent client would stall every accept). ``run``
    serves until ``stop`` or ``close`` (from another thread).
    """

    def __init__(
        self, app: Any, host: str, port: int, cert: Path, key: Path, limits: ServerLimits
    ) -> None:
        self._server = _TlsWsgiServer(app, host, port, limits)
        self._server.ssl_adapter = _TlsAdapter(str(cert), str(key))
        self.addresses = self._server.addresses
        self.failed_handshakes = self._server.failed_handshakes  # by reason

    @property
    def port(self) -> int:
        """The bound port (once ``run`` has started)."""
        return int(self._server.bind_addr[1])

    def run(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def close(self) -> None:
        self._server.stop()


def make_tls_server(
    app: Any, host: str, port: int, cert: Path, key: Path, limits: ServerLimits
) -> TlsServer:
    """The app over HTTPS on ``host:port``; a missing or unusable certificate is a ConfigError."""
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
