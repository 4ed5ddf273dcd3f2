"""No request can wedge or poison the coordinator (issue: hostile input).

Invariants checked here, after every hostile request:
1. no request can make a later, valid request fail, before or after a restart;
2. a reply other than 2xx leaves every piece of state unchanged (database rows,
   files, the device's task, the model) and the round's model equals the one
   built from the valid uploads alone;
3. every number that comes in is bounded, typed and finite, or refused with a 4xx
   and a code;
4. every JSON the service emits is strict JSON;
5. statistics counts are integers equal to what the device was asked to summarise.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from coordinator_helpers import (
    ARCH,
    PROFILE,
    assert_error,
    auth,
    constant_update,
    global_model,
    make_config,
    register,
    report_statistics,
    statistics_body,
    update_body,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from coordinator.errors import ApiError, ErrorCode
from coordinator.intake import check_update, parse_update
from coordinator.store import StateError

EXPECTED_BIAS = torch.tensor([3.0] * 4 + [1.5] * 12 + [1.0] * 48)  # a=1, c=2, e=6 (Fix a1-c1-e1)
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def strict_json(data: bytes):
    def refuse(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


def state_snapshot(app, state_dir: Path):
    """Everything a refused request must leave alone."""
    db = sqlite3.connect(state_dir / "coordinator.sqlite3")
    try:
        rows = {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("devices", "rounds", "tasks")
        }
    finally:
        db.close()
    files = sorted(
        (str(p.relative_to(state_dir)), p.stat().st_size)
        for p in state_dir.rglob("*")
        if p.is_file() and not p.name.startswith("coordinator.sqlite3")
    )
    board = app.extensions["heterofl"].board
    statuses = {d: board.status_of(d) for d in board.view().tasks} if board.view() else {}
    return rows, files, statuses, app.extensions["heterofl"].model_bytes()


def finish_round_validly(client, coordinator, tokens):
    """Devices a, c, e upload 1s, 2s and 6s (e holds labels 0, 1), then report statistics."""
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    for token, task, value, labels in zip(
        tokens, tasks, (1, 2, 6), (list(range(10)), list(range(10)), [0, 1]), strict=True
    ):
        if task["action"] != "train":
            continue
        body = update_body(constant_update(task["rate"], value), labels)
        reply = client.post(task["upload_url"], data=body, headers=auth(token))
        assert reply.status_code == 200, reply.json
    report_statistics(client, coordinator, tokens)
    state = global_model(client)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_BIAS)
    assert torch.equal(state["classifier.bias"], torch.tensor([3.0, 3.0] + [1.5] * 8))
    for name in ("/v1/rounds", "/v1/health", "/v1/devices"):
        strict_json(client.get(name).data)


# -- hostile values for every field ---------------------------------------------------------
HUGE_INTEGER = 10**400
hostile_numbers = st.one_of(
    st.sampled_from(
        [
            math.inf,
            -math.inf,
            math.nan,
            1e308,
            -1e308,
            1e30,
            HUGE_INTEGER,
            -HUGE_INTEGER,
            2**63,
            -1,
            0,
            0.5,
            True,
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0 < abs(x) < 1e6),
)
hostile_json = st.recursive(
    st.one_of(st.none(), st.booleans(), hostile_numbers, st.text(max_size=50)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def json_text(value) -> str:
    return json.dumps(value, allow_nan=True)  # NaN/Infinity as a client could send them


@st.composite
def hostile_update_bodies(draw):
    """An update from the level-a device that must be refused for one reason or another."""
    kind = draw(st.sampled_from(["num_samples", "labels", "metrics", "tensor", "bytes", "nested"]))
    tensors = constant_update(1.0, 1.0)
    metadata = {"num_samples": "600", "labels": json.dumps(list(range(10)))}
    if kind == "num_samples":
        value = draw(
            st.one_of(hostile_numbers, st.text(max_size=5), st.lists(st.integers(), max_size=2))
        )
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10**9:
            value = -value
        metadata["num_samples"] = json_text(value)
    elif kind == "labels":
        metadata["labels"] = json_text(
            draw(
                st.one_of(
                    st.lists(hostile_numbers, min_size=1, max_size=3).filter(
                        lambda labels: not all(_valid_label(x) for x in labels)
                    ),
                    st.just([]),
                    st.just([0, 0]),
                    st.just(list(range(11))),
                    st.just([10]),
                    hostile_json.filter(lambda v: not isinstance(v, list)),
                )
            )
        )
    elif kind == "metrics":
        bad = draw(
            st.one_of(
                st.dictionaries(
                    st.sampled_from(["loss", "accuracy"]), hostile_numbers, min_size=1
                ).filter(lambda d: any(not _acceptable_metric(v) for v in d.values())),
                st.just({f"m{i}": 1.0 for i in range(100)}),
                st.just({"x" * 300: 1.0}),
                hostile_json.filter(lambda v: not isinstance(v, dict)),
            )
        )
        metadata["metrics"] = json_text(bad)
    elif kind == "tensor":
        name = draw(st.sampled_from(sorted(tensors)))
        change = draw(st.sampled_from(["nan", "inf", "dtype", "shape", "missing", "extra"]))
        if change == "nan":
            tensors[name].view(-1)[0] = math.nan
        elif change == "inf":
            tensors[name].view(-1)[-1] = -math.inf
        elif change == "dtype":
            tensors[name] = tensors[name].double()
        elif change == "shape":
            tensors[name] = torch.ones(tensors[name].numel() + 1)
        elif change == "missing":
            del tensors[name]
        else:
            tensors["stowaway"] = torch.ones(3)
    elif kind == "nested":
        metadata["metrics"] = "[" * 5000 + "]" * 5000
    body = save(tensors, metadata)
    if kind == "bytes":
        cut = draw(st.sampled_from(["truncate", "pickle", "header", "empty"]))
        body = {
            "truncate": body[: len(body) // 2],
            "pickle": b"\x80\x04\x95pickle",
            "header": (2**40).to_bytes(8, "little") + body[8:],
            "empty": b"",
        }[cut]
    return body


def _valid_label(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10


def _acceptable_metric(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and abs(float(value)) <= 1e12
    except OverflowError:
        return False


@st.composite
def hostile_statistics_bodies(draw):
    count = 600.0
    mean, var = 0.0, 1.0
    field = draw(st.sampled_from(["count", "mean", "var", "names"]))
    if field == "count":
        count = draw(st.sampled_from([math.inf, math.nan, 1e30, -600.0, 0.0, 599.5, 601.0, 6000.0]))
    elif field == "mean":
        mean = draw(st.sampled_from([math.nan, math.inf, 1e30]))
    elif field == "var":
        var = draw(st.sampled_from([-1.0, math.inf, 1e30]))
    body = statistics_body(count, mean, var)
    if field == "names":
        return save({"blocks.0.norm.count": torch.tensor(600.0)})
    return body


# -- the properties ---------------------------------------------------------------------------
def test_hostile_uploads_change_nothing_and_the_round_still_completes(make_app, tmp_path):
    app = make_app()
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    coordinator.settle()
    client.get("/v1/task", headers=auth(tokens[0]))
    before = state_snapshot(app, tmp_path / "state")

    @given(body=hostile_update_bodies())
    @HYPOTHESIS
    def refused(body):
        reply = client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0]))
        assert 400 <= reply.status_code < 500, (reply.status_code, reply.data[:200])
        assert ErrorCode(strict_json(reply.data)["code"])
        assert state_snapshot(app, tmp_path / "state") == before

    refused()
    finish_round_validly(client, coordinator, tokens)


def _intake_outcome(parse, body):
    try:
        facts = parse(body, ARCH.spec, 1.0, ARCH.num_classes)
    except ApiError as exc:
        return exc.error_code
    return facts.num_samples, facts.labels, facts.metrics


def crafted_layouts() -> list[bytes]:
    """Valid tensors under a hand-edited safetensors header: layouts a library would not write."""
    good = update_body(constant_update(1.0, 1.0))
    length = int.from_bytes(good[:8], "little")
    header, data = json.loads(good[8 : 8 + length]), good[8 + length :]
    names = sorted(n for n in header if n != "__metadata__")

    def body(changed: dict, padding: bytes = b"", tail: bytes = b"") -> bytes:
        text = json.dumps(changed).encode() + padding
        return len(text).to_bytes(8, "little") + text + data + tail

    def edited(name: str, field: str, value) -> dict:
        copy = json.loads(json.dumps(header))
        copy[name][field] = value
        return copy

    bodies = [body(header, b"   "), body(header, tail=b"\0"), body(header, tail=b"\0" * 4)]
    bodies += [body(edited(names[0], "dtype", d)) for d in ("I32", "U32", "F16", "BF16", "F64")]
    bodies += [
        body(edited(names[1], "data_offsets", header[names[0]]["data_offsets"])),  # overlap
        body(edited(names[0], "shape", [0, *header[names[0]]["shape"][1:]])),
        body(edited(names[0], "shape", [2**64])),
        body(edited(names[0], "shape", [-1])),
        body({**header, "__metadata__": None}),
    ]
    return bodies


@given(body=st.one_of(hostile_update_bodies(), st.just(update_body(constant_update(1.0, 2.0)))))
@HYPOTHESIS
def test_the_request_path_check_refuses_exactly_what_the_full_parse_refuses(body):
    """The upload handler checks without building tensors; it must agree with the parser."""
    assert _intake_outcome(check_update, body) == _intake_outcome(parse_update, body)


def test_the_request_path_check_agrees_with_the_full_parse_on_crafted_layouts():
    outcomes = [
        (_intake_outcome(check_update, b), _intake_outcome(parse_update, b))
        for b in crafted_layouts()
    ]
    assert all(mine == full for mine, full in outcomes), outcomes
    assert outcomes[0][0] == (600, None, {"loss": 0.5, "accuracy": 0.9})  # padded: accepted


def test_the_request_path_check_names_the_tensor_holding_nan():
    tensors = constant_update(1.0, 1.0)
    name = sorted(tensors)[3]
    tensors[name].view(-1)[-1] = math.nan
    with pytest.raises(ApiError) as refused:
        check_update(update_body(tensors), ARCH.spec, 1.0, ARCH.num_classes)
    assert refused.value.error_code is ErrorCode.not_finite
    assert name in refused.value.message


def test_hostile_statistics_change_nothing_and_the_round_still_completes(make_app, tmp_path):
    app = make_app()
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    coordinator.settle()
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    for token, task, value, labels in zip(
        tokens, tasks, (1, 2, 6), (list(range(10)), list(range(10)), [0, 1]), strict=True
    ):
        body = update_body(constant_update(task["rate"], value), labels)
        assert client.post(task["upload_url"], data=body, headers=auth(token)).status_code == 200
    coordinator.settle()
    before = state_snapshot(app, tmp_path / "state")

    @given(body=hostile_statistics_bodies())
    @HYPOTHESIS
    def refused(body):
        reply = client.post("/v1/rounds/1/statistics", data=body, headers=auth(tokens[0]))
        assert 400 <= reply.status_code < 500, (reply.status_code, reply.data[:200])
        assert ErrorCode(strict_json(reply.data)["code"])
        assert state_snapshot(app, tmp_path / "state") == before

    refused()
    finish_round_validly(client, coordinator, tokens)


def test_hostile_registrations_are_refused_and_bounded(make_app, tmp_path):
    app = make_app()
    client = app.test_client()
    before = state_snapshot(app, tmp_path / "state")

    @given(
        field=st.sampled_from(["step_ms", "reference_rate", "memory_mb", "bandwidth_mbps"]),
        value=hostile_json,
    )
    @HYPOTHESIS
    def refused(field, value):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and abs(value) < 1e300 and math.isfinite(float(value)) and 0 < value <= 1:
            value = -value  # keep it hostile
        body = json_text({**PROFILE, field: value})
        reply = client.post("/v1/devices", data=body, content_type="application/json")
        assert reply.status_code == 400, reply.data[:300]
        assert strict_json(reply.data)["code"] == "bad_profile"
        assert state_snapshot(app, tmp_path / "state") == before

    refused()
    assert_error(
        client.post("/v1/devices", data="[" * 100_000, content_type="application/json"),
        413,
        ErrorCode.payload_too_large,
    )
    deep = "[" * 5000 + "]" * 5000
    assert_error(
        client.post("/v1/devices", data=deep, content_type="application/json"),
        400,
        ErrorCode.bad_profile,
    )
    padded = client.post("/v1/devices", json={**PROFILE, "padding": "x" * 50_000})
    assert padded.status_code == 201  # unknown fields are dropped, never stored
    stored = client.get("/v1/devices").json["devices"][0]["profile"]
    assert "padding" not in stored and len(json.dumps(stored)) < 400


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/rounds/9223372036854775808/weights", 400, ErrorCode.invalid_request),
        ("/v1/rounds/99999999999999999999999999/update", 400, ErrorCode.invalid_request),
        ("/v1/rounds/0/weights", 400, ErrorCode.invalid_request),
        ("/v1/rounds/-1/weights", 404, ErrorCode.not_found),
        ("/v1/rounds/abc/weights", 404, ErrorCode.not_found),
        ("/v1/rounds/7/weights", 404, ErrorCode.unknown_round),
    ],
)
def test_round_numbers_in_paths_are_bounded(client, coordinator, path, status, code):
    tokens = register(client)
    coordinator.settle()
    method = client.post if path.endswith("update") else client.get
    assert_error(method(path, headers=auth(tokens[0])), status, code)


def test_every_error_reply_has_a_code(client, coordinator):
    tokens = register(client)
    coordinator.settle()
    stranger = client.post("/v1/devices", json=PROFILE).json["token"]  # not in round 1
    body = update_body(constant_update(1.0, 1), list(range(10)))
    cases = [
        (client.get("/v1/task"), 401, ErrorCode.missing_token),
        (client.get("/v1/task", headers=auth("nope")), 401, ErrorCode.unknown_token),
        (
            client.post("/v1/rounds/1/update", data=body, headers=auth(stranger)),
            403,
            ErrorCode.not_assigned,
        ),
        (
            client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[2])),
            422,
            ErrorCode.bad_shape,
        ),
        (
            client.post("/v1/rounds/1/statistics", data=body, headers=auth(tokens[0])),
            409,
            ErrorCode.round_closed,
        ),
        (client.get("/v1/nowhere"), 404, ErrorCode.not_found),
        (client.delete("/v1/task"), 405, ErrorCode.method_not_allowed),
        (
            client.post(
                "/v1/rounds/1/update", data=b"x" * (16 * 2**20 + 1), headers=auth(tokens[0])
            ),
            413,
            ErrorCode.payload_too_large,
        ),
        (client.get("/v1/artifacts/conv/a/manifest.json"), 503, ErrorCode.not_ready),
    ]
    for reply, status, code in cases:
        assert_error(reply, status, code)
    assert client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0])).status_code == 200
    assert_error(
        client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0])),
        409,
        ErrorCode.duplicate_upload,
    )
    document = client.get("/v1/openapi.json").json
    listed = document["components"]["schemas"]["ErrorCode"]["enum"]
    assert sorted(listed) == sorted(c.value for c in ErrorCode)


def test_non_finite_values_never_reach_the_json_replies(client, coordinator):
    tokens = register(client)
    coordinator.settle()
    body = update_body(constant_update(1.0, 1), list(range(10)), metrics={"loss": 0.25})
    assert client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0])).status_code == 200
    nan_metrics = save(constant_update(0.25, 1), {"num_samples": "600", "metrics": '{"loss": NaN}'})
    assert_error(
        client.post("/v1/rounds/1/update", data=nan_metrics, headers=auth(tokens[1])),
        400,
        ErrorCode.bad_metadata,
    )
    rounds = strict_json(client.get("/v1/rounds").data)["rounds"]
    assert rounds[0]["assignments"][0]["metrics"] in ({"loss": 0.25}, None)


def test_the_openapi_document_is_valid_and_declares_every_path_parameter(client):
    from openapi_spec_validator import validate

    document = client.get("/v1/openapi.json").json
    validate(document)
    for path, item in document["paths"].items():
        declared = {
            p["name"]
            for operation in item.values()
            for p in operation.get("parameters", [])
            if p["in"] == "path"
        }
        wanted = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert declared == wanted, path
    update = document["paths"]["/v1/rounds/{number}/update"]["post"]
    assert "application/vnd.safetensors" in update["requestBody"]["content"]


def test_a_damaged_state_folder_says_how_to_recover(make_app, tmp_path):
    """A stored result that an older defect let in: start-up names it and the way out."""
    config = make_config(tmp_path / "state")
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    coordinator.settle()
    body = update_body(constant_update(1.0, 1), list(range(10)))
    assert client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0])).status_code == 200
    coordinator.close()
    db = sqlite3.connect(tmp_path / "state" / "coordinator.sqlite3")
    poisoned = save({"blocks.0.conv.bias": torch.full((64,), math.inf)})
    db.execute("UPDATE tasks SET payload = ? WHERE status = 'uploaded'", (poisoned,))
    db.commit()
    db.close()
    with pytest.raises(StateError, match="coordinator repair") as refused:
        make_app(config)
    assert "does not pass the checks" in refused.value.message

    from heterofl_edge.cli import main

    with pytest.raises(SystemExit) as done:
        main(["coordinator", "repair", "--state-dir", str(tmp_path / "state")])
    assert done.value.code in (0, None)
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    coordinator.settle()
    assert client.get("/v1/rounds").json["rounds"][0]["state"] == "failed"
    tasks = [client.get("/v1/task", headers=auth(t)).json for t in tokens]
    assert [t["round"] for t in tasks] == [2, 2, 2]


def test_after_hostile_input_a_restart_gives_the_undisturbed_model(make_app, tmp_path):
    config = make_config(tmp_path / "state", rounds=1)
    app = make_app(config)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    coordinator.settle()
    for body in (
        statistics_body(math.inf, 0.0),
        update_body(constant_update(1.0, 1), metrics={"loss": HUGE_INTEGER}),
        save(constant_update(1.0, 1), {"num_samples": "1e400"}),
    ):
        for path in ("/v1/rounds/1/update", "/v1/rounds/1/statistics"):
            reply = client.post(path, data=body, headers=auth(tokens[0]))
            assert 400 <= reply.status_code < 500
    body = update_body(constant_update(1.0, 1), list(range(10)))
    assert client.post("/v1/rounds/1/update", data=body, headers=auth(tokens[0])).status_code == 200
    coordinator.close()
    restarted = make_app(config)
    client, coordinator = restarted.test_client(), restarted.extensions["heterofl"]
    coordinator.settle()
    finish_round_validly(client, coordinator, tokens)
    for name in ("/v1/health", "/v1/rounds", "/v1/task"):
        reply = client.get(name, headers=auth(tokens[0]))
        assert reply.status_code == 200
        strict_json(reply.data)
