"""Admission: enrollment and operator tokens, the registration rate, what a profile must say."""

from __future__ import annotations

import json
import stat

import pytest
from coordinator_helpers import PROFILE, assert_error, auth, register

from coordinator.admission import AdmissionConfig, RateLimiter, resolve_token
from coordinator.errors import ErrorCode
from heterofl_edge.errors import ConfigError

TOKEN = "enrol-" + "x" * 20
OPERATOR = "operator-" + "y" * 20


def test_registration_needs_the_enrollment_token_where_there_is_one(make_app):
    client = make_app(admission=AdmissionConfig(enrollment_token=TOKEN)).test_client()
    assert_error(client.post("/v1/devices", json=PROFILE), 401, ErrorCode.enrollment_required)
    wrong = {**PROFILE, "enrollment_token": TOKEN[:-1] + "z"}
    assert_error(client.post("/v1/devices", json=wrong), 401, ErrorCode.bad_enrollment_token)
    reply = client.post("/v1/devices", json={**PROFILE, "enrollment_token": TOKEN})
    assert reply.status_code == 201
    (device,) = client.get("/v1/devices").json["devices"]
    assert "enrollment_token" not in device["profile"]  # never stored, never served


def test_the_operators_views_need_the_operator_token_where_there_is_one(make_app):
    client = make_app(admission=AdmissionConfig(operator_token=OPERATOR)).test_client()
    tokens = register(client)  # devices are not operators: their calls are unaffected
    assert client.get("/v1/task", headers=auth(tokens[0])).status_code == 200
    assert client.get("/v1/health").status_code == 200  # devices read it before registering
    for path in ("/v1/devices", "/v1/rounds", "/metrics"):
        assert_error(client.get(path), 401, ErrorCode.operator_token_required)
        assert_error(
            client.get(path, headers=auth(tokens[0])), 401, ErrorCode.operator_token_required
        )
        assert client.get(path, headers=auth(OPERATOR)).status_code == 200


def test_registrations_from_one_address_are_rate_limited(make_app, clock):
    client = make_app(
        admission=AdmissionConfig(registrations_per_minute=6, registration_burst=3)
    ).test_client()
    for _ in range(3):
        assert client.post("/v1/devices", json=PROFILE).status_code == 201
    refused = client.post("/v1/devices", json=PROFILE)
    assert_error(refused, 429, ErrorCode.too_many_registrations)
    assert refused.headers["Retry-After"] == "10"  # 6 a minute: one every 10 s
    other = client.post("/v1/devices", json=PROFILE, environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert other.status_code == 201  # another address has its own budget
    clock.advance(10)
    assert client.post("/v1/devices", json=PROFILE).status_code == 201
    assert len(client.get("/v1/devices").json["devices"]) == 5


def test_the_rate_limiter_forgets_the_oldest_addresses_beyond_its_bound():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0], max_keys=2)
    assert limiter.take("a") is None and limiter.take("a") == pytest.approx(1.0)
    limiter.take("b")
    limiter.take("c")  # "a" is forgotten: it starts again with a full bucket
    assert limiter.take("a") is None
    assert RateLimiter(per_minute=0, burst=0, clock=lambda: 0.0).take("a") is None  # no limit


def test_tokens_auto_made_once_and_kept_private(tmp_path):
    made = resolve_token("auto", "enrollment", tmp_path)
    assert made is not None and len(made) >= 24
    assert resolve_token("auto", "enrollment", tmp_path) == made  # kept across restarts
    assert resolve_token("auto", "operator", tmp_path) not in (None, made)
    assert stat.S_IMODE((tmp_path / "admission.json").stat().st_mode) == 0o600
    assert resolve_token("none", "operator", tmp_path) is None
    assert resolve_token(TOKEN, "operator", tmp_path) == TOKEN
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_token("short", "enrollment", tmp_path)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"step_ms": 5, "step_ms": 6}', "duplicate key 'step_ms'"),
        ('{"step_ms": NaN}', "NaN is not a JSON number"),
        ('{"memory_mb": Infinity}', "Infinity is not a JSON number"),
        ('{"memory_mb": -Infinity}', "-Infinity is not a JSON number"),
    ],
)
def test_registration_json_is_strict(make_app, tmp_path, body, problem):
    client = make_app().test_client()
    fields = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in PROFILE.items() if k not in body)
    text = "{" + fields + ", " + body[1:]
    reply = client.post("/v1/devices", data=text, content_type="application/json")
    assert_error(reply, 400, ErrorCode.bad_profile)
    assert problem in reply.json["message"]
    assert client.get("/v1/devices").json["devices"] == []


@pytest.mark.parametrize("rate", [0.5, 5e-324, 0.0625 + 1e-6])
def test_a_reference_rate_off_the_levels_in_play_is_a_400_listing_them(make_app, rate):
    client = make_app(mode="a-e").test_client()
    reply = client.post("/v1/devices", json={**PROFILE, "reference_rate": rate})
    assert_error(reply, 400, ErrorCode.bad_profile)
    assert "accepted rates are 0.0625 (e), 1 (a)" in reply.json["message"]
    assert client.get("/v1/devices").json["devices"] == []


def test_runtimes_are_checked_against_the_registry_and_the_offered_formats(make_app):
    client = make_app().test_client()  # offers onnx only
    reply = client.post("/v1/devices", json={**PROFILE, "runtimes": ["tensorflow-lite"]})
    assert_error(reply, 400, ErrorCode.bad_profile)
    assert "onnx-web" in reply.json["message"]  # the accepted names are listed
    reply = client.post("/v1/devices", json={**PROFILE, "runtimes": ["executorch"]})
    assert_error(reply, 400, ErrorCode.unsupported_runtime)
    assert "--formats onnx,executorch" in reply.json["hint"]
    assert_error(
        client.post("/v1/devices", json={**PROFILE, "runtimes": []}), 400, ErrorCode.bad_profile
    )
    for runtimes in (["onnx-web"], ["executorch", "onnx"]):
        assert client.post("/v1/devices", json={**PROFILE, "runtimes": runtimes}).status_code == 201


def test_the_startup_links_carry_the_tokens_and_a_qr_code():
    from heterofl_edge.cli.coordinator_cmd import announcement

    admission = AdmissionConfig(enrollment_token=TOKEN, operator_token=OPERATOR)
    text = announcement("conv", "a-e", "profile", "https", "192.168.1.20", 8443, admission, True)
    assert f"device link: https://192.168.1.20:8443/device/#enroll={TOKEN}" in text
    assert f"live page:   https://192.168.1.20:8443/#operator={OPERATOR}" in text
    assert "scan to open the device page" in text and "█" in text
    plain = announcement(
        "conv", "a-e", "profile", "http", "127.0.0.1", 8080, AdmissionConfig(), False
    )
    assert "device link: http://127.0.0.1:8080/device/\n" in plain + "\n" and "█" not in plain
