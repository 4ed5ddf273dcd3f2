"""No client can lock the fleet out: request deadlines, a minimum rate, caps, JSON refusals.

The server tests run the coordinator in process under the real servers (waitress for HTTP,
cheroot for HTTPS) on 127.0.0.1; the hostile clients bind their sockets to 127.0.0.2, so the
server sees them as another address than the honest client's 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests
from coordinator_helpers import PROFILE, make_config

from coordinator.api import pages
from coordinator.app import create_app
from coordinator.errors import ErrorCode
from coordinator.process import free_port
from coordinator.server import (
    ServerLimits,
    client_key,
    make_server,
    make_tls_server,
    time_left,
)
from heterofl_edge.cli import coordinator_cmd
from heterofl_edge.errors import ConfigError

HOSTILE = "127.0.0.2"


# --- the rules, by hand -----------------------------------------------------------------


def test_time_left_while_the_headers_arrive():
    limits = ServerLimits(request_timeout=15, min_transfer_rate=1000, body_timeout=30)
    left, why = time_left(limits, elapsed=10, silent_for=1, received=300, length=None)
    assert left == pytest.approx(5) and "headers" in why
    left, _ = time_left(limits, elapsed=15.5, silent_for=1, received=300, length=None)
    assert left < 0


def test_time_left_of_a_body_behind_the_minimum_rate():
    limits = ServerLimits(request_timeout=15, min_transfer_rate=1000, body_timeout=30)
    # 15 s of grace + 2,000 bytes at 1,000 bytes/s = 17 s; 16 s have passed
    left, why = time_left(limits, elapsed=16, silent_for=2, received=2000, length=100_000)
    assert left == pytest.approx(1) and "slower than 1000 bytes/s" in why
    # one byte every 10 s: behind after 15 s, long before its deadline of 115 s
    left, _ = time_left(limits, elapsed=20, silent_for=0, received=102, length=100_000)
    assert left < 0 and limits.request_deadline(100_000) == pytest.approx(115)


def test_time_left_of_a_fast_body_that_stalls_or_overruns_its_deadline():
    limits = ServerLimits(request_timeout=15, min_transfer_rate=1000, body_timeout=30)
    # fast at first (far ahead of the rate), then silent for 31 s: the stall decides
    left, why = time_left(limits, elapsed=40, silent_for=31, received=90_000, length=100_000)
    assert left == pytest.approx(-1) and "30 s" in why
    # ahead of the rate by the headers' bytes, but past the whole request's 115 s
    left, why = time_left(limits, elapsed=115.1, silent_for=0, received=100_200, length=100_000)
    assert left == pytest.approx(-0.1) and "deadline" in why


def test_client_addresses_count_per_ip_and_per_ipv6_64():
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9")
    assert client_key("2001:db8:1:2::1") != client_key("2001:db8:1:3::1")
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("/run/coordinator.sock") == "/run/coordinator.sock"


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("request_timeout", 0.0, "--request-timeout"),
        ("min_transfer_rate", -1.0, "--min-transfer-rate"),
        ("silent_connection_timeout", math.nan, "--silent-connection-timeout"),
        ("idle_timeout", math.inf, "--idle-timeout"),
        ("connections_per_address", 0, "--connections-per-address"),
        ("threads", 0, "--threads"),
    ],
)
def test_a_bad_limit_is_a_config_error_naming_its_flag(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        ServerLimits(**{field: value})


def test_the_serve_flags_default_to_the_server_limits():
    parameters = inspect.signature(coordinator_cmd.serve).parameters
    for field in dataclasses.fields(ServerLimits):
        if field.name in parameters:  # all but max_body_bytes, which the config sets
            default = parameters[field.name].default
            assert default in (None, getattr(ServerLimits(), field.name))  # None: per --host
    exposed = coordinator_cmd.per_address_limits(True, 1000, None, None)
    assert exposed == (ServerLimits().connections_per_address, 60.0)
    assert coordinator_cmd.per_address_limits(False, 1000, None, None) == (1000, 0.0)
    assert coordinator_cmd.per_address_limits(False, 1000, 8, 5.0) == (8, 5.0)


def test_a_bad_limit_on_the_command_line_is_one_line_and_exit_code_2(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "heterofl_edge", "coordinator", "serve",
            "--state-dir", str(tmp_path / "state"), "--min-transfer-rate", "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: --min-transfer-rate must be a positive, finite number, got 0.0"
    ]
    assert not (tmp_path / "state").exists()  # refused before anything started


# --- the app's own refusals ----------------------------------------------------------------


@pytest.fixture
def app(tmp_path):
    application = create_app(make_config(tmp_path / "state"), start=False)
    yield application
    application.extensions["heterofl"].close()


def test_405_names_the_allowed_methods(app):
    reply = app.test_client().delete("/v1/health")
    assert reply.status_code == 405 and reply.json["code"] == "method_not_allowed"
    assert "GET" in {m.strip() for m in reply.headers["Allow"].split(",")}


@pytest.mark.parametrize(
    "path",
    [
        "/static/dashboard/index%00.html",
        "/static/device/a%00b",
        "/static/dashboard/" + "x" * 5000,
        "/device/device.html%00",
        "/device/" + "x" * 5000,
    ],
)
def test_a_path_the_filesystem_cannot_hold_is_404(app, monkeypatch, path):
    # as if 'make web' had installed the device page
    monkeypatch.setattr(pages, "_device_assets", lambda: {"device.html": {}})
    reply = app.test_client().get(path)
    assert reply.status_code == 404 and reply.json["code"] == "not_found"


# --- real sockets: waitress ----------------------------------------------------------------


@contextlib.contextmanager
def serving(app, limits):
    """The app under make_server on a free port of 127.0.0.1, served by a thread."""
    server = make_server(app, "127.0.0.1", 0, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        server.close()
        assert not thread.is_alive()


def connect(port, source=HOSTILE, timeout=10.0):
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def wait_until(condition, seconds=20.0, what="the condition"):
    """Poll a condition on the real server until it holds (AssertionError after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.02)


def read_reply(sock) -> tuple[int, dict]:
    """Status and JSON body of the next reply on ``sock`` (by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["Content-Length"]):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


def timed_health(base: str) -> float:
    with requests.Session() as session:
        started = time.monotonic()
        reply = session.get(f"{base}/v1/health", timeout=30)
        seconds = time.monotonic() - started
    assert reply.ok, reply.text
    return seconds


def trickle(socks, every: float, seconds: float) -> dict:
    """Send one byte every ``every`` s on each socket until it is answered and closed.

    Returns, per socket, the reply's bytes and when it ended (monotonic).
    """
    selector = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    replies = {sock: b"" for sock in socks}
    ended: dict = {}
    open_socks = set(socks)
    next_byte = time.monotonic() + every
    deadline = time.monotonic() + seconds
    while open_socks and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= next_byte:
            for sock in list(open_socks):
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.send(b"x")
            next_byte = now + every
        for key, _ in selector.select(timeout=max(0.0, min(next_byte, deadline) - now)):
            sock = key.fileobj
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                continue
            except OSError:  # reset: ended all the same
                chunk = b""
            if chunk:
                replies[sock] += chunk
            else:
                ended[sock] = time.monotonic()
                open_socks.discard(sock)
                selector.unregister(sock)
    selector.close()
    return {sock: (replies[sock], ended.get(sock)) for sock in socks}


def test_idle_and_trickling_connections_from_one_address_do_not_hold_off_another(app):
    """300 idle and 100 trickling connections from 127.0.0.2; 127.0.0.1 is answered in 2 s."""
    limits = ServerLimits(
        request_timeout=3.0,
        min_transfer_rate=5000.0,  # a deadline of 3 + 100,000 / 5,000 = 23 s
        silent_connection_timeout=120.0,  # the idle ones stay for the whole test
        connections_per_address=500,
    )
    socks = []
    with serving(app, limits) as server:
        try:
            socks = [connect(server.port) for _ in range(400)]
            idle, trickling = socks[:300], socks[300:]
            wait_until(
                lambda: server.addresses.count(HOSTILE) == 400, what="400 connections accepted"
            )
            started = {}
            for sock in trickling:
                sock.sendall(
                    b"POST /v1/devices HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
                )
                started[sock] = time.monotonic()

            latency = timed_health(f"http://127.0.0.1:{server.port}")

            assert latency < 2.0, f"GET /v1/health took {latency:.2f} s"
            assert server.addresses.count(HOSTILE) == 400  # all were still open meanwhile
            outcome = trickle(trickling, every=1.0, seconds=60)
            deadline = limits.request_deadline(100_000)
            for sock in trickling:
                data, ended = outcome[sock]
                head, _, body = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 408"), data[:200]
                reply = json.loads(body)
                assert reply["code"] == ErrorCode.request_timeout
                assert "slower than 5000 bytes/s" in reply["message"]  # the rate, not the deadline
                assert ended is not None and ended - started[sock] < deadline
            assert server.addresses.count(HOSTILE) == len(idle)  # the idle ones remain
        finally:
            for sock in socks:
                sock.close()


def test_default_limits_cap_one_address_and_let_another_through(app):
    limits = ServerLimits()
    socks = []
    with serving(app, limits) as server:
        try:
            socks = [connect(server.port) for _ in range(limits.connections_per_address)]
            wait_until(lambda: server.addresses.count(HOSTILE) == limits.connections_per_address)
            with connect(server.port) as refused:
                status, reply = read_reply(refused)
            assert status == 503 and reply["code"] == ErrorCode.too_many_connections
            assert timed_health(f"http://127.0.0.1:{server.port}") < 2.0
            socks.pop().close()  # a place comes free: the same address gets through again
            wait_until(
                lambda: server.addresses.count(HOSTILE) == limits.connections_per_address - 1
            )
            with connect(server.port) as again:
                again.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, reply = read_reply(again)
            assert status == 200 and reply["model"] == "conv"
        finally:
            for sock in socks:
                sock.close()


def test_a_silent_connection_is_closed_and_a_used_one_kept_until_its_idle_timeout(app):
    limits = ServerLimits(silent_connection_timeout=1.0, idle_timeout=30.0)
    with serving(app, limits) as server, connect(server.port) as used:
        used.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(used)[0] == 200
        with connect(server.port) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the server, no reply: it asked nothing
            waited = time.monotonic() - started
        assert 1.0 <= waited < 10.0
        used.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, reply = read_reply(used)  # still open, past the silent connection's timeout
        assert status == 200 and reply["model"] == "conv"


SLOW_LIMITS = ServerLimits(request_timeout=1.0, min_transfer_rate=2000.0)


def upload_slowly(sock) -> tuple[int, dict, float]:
    """Register with a 6,000-byte JSON body sent at 2,500 bytes/s: status, reply, seconds."""
    body = json.dumps(PROFILE).encode().ljust(6000)  # JSON padded with spaces
    sock.sendall(
        b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    started = time.monotonic()
    for offset in range(0, len(body), 500):  # a throttled link
        sock.sendall(body[offset : offset + 500])
        time.sleep(0.2)
    status, reply = read_reply(sock)
    return status, reply, time.monotonic() - started


def test_an_honest_upload_at_the_minimum_rate_is_accepted(app):
    with serving(app, SLOW_LIMITS) as server, connect(server.port, source="127.0.0.1") as sock:
        status, reply, took = upload_slowly(sock)
    assert status == 201 and reply["token"], reply
    assert took > 2.0  # it really was slow: 2.4 s of sending


def test_waitress_refuses_a_body_over_the_limit_with_json_413(app):
    limits = ServerLimits(max_body_bytes=1000)
    with serving(app, limits) as server:
        with connect(server.port, source="127.0.0.1") as sock:
            sock.sendall(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
            status, reply = read_reply(sock)
        assert status == 413 and reply["code"] == ErrorCode.payload_too_large
        assert "1000 bytes" in reply["message"]
        exactly = json.dumps(PROFILE).encode().ljust(1000)  # the limit itself is allowed
        with connect(server.port, source="127.0.0.1") as sock:
            sock.sendall(
                b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: 1000\r\n\r\n" + exactly
            )
            status, reply = read_reply(sock)
        assert status == 201, reply


def test_waitress_answers_a_malformed_request_with_json_400(app):
    with serving(app, ServerLimits()) as server, connect(server.port, source="127.0.0.1") as sock:
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        status, reply = read_reply(sock)
    assert status == 400 and reply["code"] == ErrorCode.invalid_request


# --- real sockets: cheroot (HTTPS) --------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def serving_tls(app, limits, certificate):
    cert, key = certificate
    server = make_tls_server(app, "127.0.0.1", free_port(), cert, key, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"https://127.0.0.1:{server.port}"
    try:
        wait_until(lambda: _answers(base, cert), what="the HTTPS server to answer")
        yield server, base
    finally:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()


def _answers(base, cert) -> bool:
    try:
        return requests.get(f"{base}/v1/health", verify=cert, timeout=5).ok
    except requests.ConnectionError:
        return False


def tls_connect(port, cert, source=HOSTILE):
    context = ssl.create_default_context(cafile=str(cert))
    return context.wrap_socket(connect(port, source), server_hostname="127.0.0.1")


def test_https_silent_connections_hold_no_thread_and_one_address_is_capped(app, certificate):
    """Silent connections wait in cheroot's selector: an honest client is served at once."""
    limits = ServerLimits(threads=4, connections_per_address=20, silent_connection_timeout=60.0)
    socks = []
    with serving_tls(app, limits, certificate) as (server, base):
        try:
            socks = [connect(server.port) for _ in range(20)]  # 5 times the worker threads
            wait_until(lambda: server.addresses.count(HOSTILE) == 20)
            started = time.monotonic()
            reply = requests.get(f"{base}/v1/health", verify=certificate[0], timeout=30)
            assert reply.ok and time.monotonic() - started < 2.0
            with (
                connect(server.port) as refused,  # the 21st: closed, no TLS to reply in
                contextlib.suppress(ConnectionResetError),
            ):
                assert refused.recv(1) == b""
            assert server.addresses.count(HOSTILE) == 20
        finally:
            for sock in socks:
                sock.close()


def test_https_trickling_requests_end_with_json_408(app, certificate):
    limits = ServerLimits(request_timeout=1.0, min_transfer_rate=1000.0)
    with serving_tls(app, limits, certificate) as (server, _):
        heads = [
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ",  # headers never finish
            b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 900\r\n\r\n{",  # the body trickles: the app answers the 408
        ]
        for head in heads:
            with tls_connect(server.port, certificate[0]) as sock:
                sock.sendall(head)
                started = time.monotonic()
                outcome = trickle([sock], every=0.25, seconds=30)
                data, ended = outcome[sock]
            status = data.split(b"\r\n", 1)[0]
            body = json.loads(data.partition(b"\r\n\r\n")[2])
            assert status.startswith(b"HTTP/1.1 408") and body["code"] == "request_timeout", data
            assert ended is not None and ended - started < limits.request_deadline(900)


def test_https_an_honest_upload_at_the_minimum_rate_is_accepted(app, certificate):
    with (
        serving_tls(app, SLOW_LIMITS, certificate) as (server, _),
        tls_connect(server.port, certificate[0], source="127.0.0.1") as sock,
    ):
        status, reply, took = upload_slowly(sock)
    assert status == 201 and reply["token"], reply
    assert took > 2.0


def test_https_refuses_a_body_over_the_limit_with_json_413(app, certificate):
    limits = ServerLimits(max_body_bytes=1000)
    with serving_tls(app, limits, certificate) as (server, _):
        with tls_connect(server.port, certificate[0], source="127.0.0.1") as sock:
            sock.sendall(b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
            status, reply = read_reply(sock)
        assert status == 413 and reply["code"] == ErrorCode.payload_too_large
        with connect(server.port, source="127.0.0.1") as plain:  # plain HTTP on the TLS port
            plain.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, reply = read_reply(plain)
        assert status == 400 and reply["code"] == ErrorCode.invalid_request


def test_https_a_client_refusing_the_certificate_is_logged_once(app, certificate, caplog):
    """A browser that has not trusted a self-signed certificate yet: one line, not one each."""
    with serving_tls(app, ServerLimits(), certificate) as (server, base):
        caplog.set_level("INFO", logger="heterofl_edge.coordinator")
        for _ in range(3):  # verifies against the system's CAs: aborts with an alert
            with pytest.raises(requests.exceptions.SSLError):
                requests.get(f"{base}/v1/health", timeout=10)
        wait_until(lambda: sum(server.failed_handshakes.values()) == 3)
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and "accepts a self-signed certificate" in lines[0], lines
