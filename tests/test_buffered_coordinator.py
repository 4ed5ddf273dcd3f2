"""Buffered aggregation through the coordinator's HTTP API, on a fake clock.

Devices a, c and e (Fix a1-c1-e1) upload constant tensors, so that every element
of every published version is known by hand: an element's new value is the
current one plus the weighted average of the updates (trained minus the weights
of the version each started from) of the devices whose slice holds it.
"""

from __future__ import annotations

import torch
from coordinator_helpers import (
    assert_error,
    auth,
    constant_update,
    global_model,
    make_config,
    register,
    upload,
)
from safetensors.torch import load

from coordinator.errors import ErrorCode
from heterofl_edge.buffered import Aggregation, StalenessKind, StalenessRule
from heterofl_edge.engine import StatisticsClients

ALL = list(range(10))
BIAS = "blocks.0.conv.bias"  # 64 units: level e holds 4, c 16, a all


def buffered(tmp_path, **overrides):
    settings = dict(
        aggregation=Aggregation.buffered,
        buffer_size=2,
        staleness=StalenessRule(StalenessKind.constant, 0.0, 0.0),
        max_staleness=1,
        rounds=4,
        statistics=StatisticsClients.none,
    )
    settings.update(overrides)
    return make_config(tmp_path / "state", **settings)


def tasks_of(client, tokens):
    return [client.get("/v1/task", headers=auth(t)).json for t in tokens]


def test_versions_fold_every_k_updates_refuse_stale_ones_and_are_exact(make_app, tmp_path):
    app = make_app(buffered(tmp_path))
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    initial = global_model(client)[BIAS].double()
    tokens = register(client)
    assert coordinator.settle()
    tasks = tasks_of(client, tokens)
    assert [(t["action"], t["round"], t["level"]) for t in tasks] == [
        ("train", 1, "a"),
        ("train", 1, "c"),
        ("train", 1, "e"),
    ]  # a task's round is the version it starts from plus one
    assert [t["weights_url"] for t in tasks] == ["/v1/rounds/1/weights"] * 3
    weights = load(client.get(tasks[1]["weights_url"], headers=auth(tokens[1])).data)
    assert torch.equal(weights[BIAS], initial[:16].float())  # c's slice of version 0

    # a and c deliver from version 0: version 1 = the average of what they trained.
    assert upload(client, tokens[0], 1, constant_update(1.0, 1.0), ALL).status_code == 200
    assert client.get("/v1/task", headers=auth(tokens[0])).json["action"] == "wait"
    assert upload(client, tokens[1], 1, constant_update(0.25, 2.0), ALL).status_code == 200
    assert coordinator.settle()
    v1 = torch.tensor([1.5] * 16 + [1.0] * 48, dtype=torch.float64)
    assert torch.equal(global_model(client)[BIAS], v1.float())
    first = client.get("/v1/rounds").json["rounds"][0]
    assert first["state"] == "finished" and first["metrics"]["buffer"]["staleness"] == [0, 0]

    # a and c train from version 1; e still trains from version 0 (staleness 1: allowed).
    tasks = tasks_of(client, tokens)
    assert [(t["action"], t["round"]) for t in tasks] == [("train", 2), ("train", 2), ("train", 1)]
    assert upload(client, tokens[2], 1, constant_update(0.0625, 6.0), [0, 1]).status_code == 200
    assert upload(client, tokens[0], 2, constant_update(1.0, 3.0), ALL).status_code == 200
    assert coordinator.settle()
    # Units 0..3: e's update 6 - v0 and a's 3 - v1, averaged; units 4..63: a's alone.
    v2 = v1 + (3.0 - v1)
    v2[:4] = v1[:4] + ((6.0 - initial[:4]) + (3.0 - v1[:4])) / 2
    assert torch.allclose(global_model(client)[BIAS].double(), v2, atol=1e-6, rtol=0)
    second = client.get("/v1/rounds").json["rounds"][1]["metrics"]["buffer"]
    assert second["staleness"] == [1, 0] and second["started_from"] == [0, 1]

    # e, free again after its stale update, got a task from version 1 at once; a trains from
    # version 2. Version 3 is theirs: c's task from version 1 is then two versions behind,
    # more than --max-staleness 1, and its upload is refused with a code.
    tasks = tasks_of(client, tokens)
    assert [t["round"] for t in tasks] == [3, 2, 2]
    assert upload(client, tokens[0], 3, constant_update(1.0, 4.0), ALL).status_code == 200
    assert upload(client, tokens[2], 2, constant_update(0.0625, 5.0), ALL).status_code == 200
    assert coordinator.settle()
    assert client.get("/v1/health").json["completed_rounds"] == 3
    stale = upload(client, tokens[1], 2, constant_update(0.25, 9.0), ALL)
    assert_error(stale, 409, ErrorCode.stale_update)
    assert coordinator.settle()
    task = client.get("/v1/task", headers=auth(tokens[1])).json
    assert (task["action"], task["round"]) == ("train", 4)  # the next task, from the newest
    again = upload(client, tokens[1], 2, constant_update(0.25, 9.0), ALL)
    assert_error(again, 409, ErrorCode.stale_update)
    history = client.get("/v1/rounds").json["rounds"]
    assert [r["state"] for r in history] == ["finished"] * 3


def test_an_acknowledged_update_survives_a_restart_and_is_folded_once(make_app, tmp_path):
    config = buffered(tmp_path)
    first_app = make_app(config)
    first = first_app.test_client()
    tokens = register(first)
    assert first_app.extensions["heterofl"].settle()
    assert upload(first, tokens[0], 1, constant_update(1.0, 1.0), ALL).status_code == 200
    first_app.extensions["heterofl"].close()  # a's update is acknowledged, not yet folded

    second_app = make_app(config)  # a new process on the same state folder
    second = second_app.test_client()
    coordinator = second_app.extensions["heterofl"]
    assert coordinator.settle()
    assert second.get("/v1/task", headers=auth(tokens[0])).json["action"] == "wait"
    assert_error(
        upload(second, tokens[0], 1, constant_update(1.0, 1.0), ALL),
        409,
        ErrorCode.duplicate_upload,
    )
    task = second.get("/v1/task", headers=auth(tokens[1])).json
    assert (task["action"], task["round"]) == ("train", 1)  # c's task survived too
    assert upload(second, tokens[1], 1, constant_update(0.25, 2.0), ALL).status_code == 200
    assert coordinator.settle()
    expected = torch.tensor([1.5] * 16 + [1.0] * 48)
    assert torch.equal(global_model(second)[BIAS], expected)
    (version,) = second.get("/v1/rounds").json["rounds"][:1]
    assert version["metrics"]["uploads"] == 2  # a's once, c's once


def test_sbn_statistics_of_a_version_come_from_its_contributors(make_app, tmp_path):
    from coordinator_helpers import statistics_body

    app = make_app(buffered(tmp_path, statistics=StatisticsClients.round, rounds=1))
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    assert upload(client, tokens[0], 1, constant_update(1.0, 1.0), ALL).status_code == 200
    assert upload(client, tokens[2], 1, constant_update(0.0625, 2.0), ALL).status_code == 200
    assert coordinator.settle()
    tasks = tasks_of(client, tokens)
    assert [t["action"] for t in tasks] == ["statistics", "train", "statistics"]
    assert tasks[0]["round"] == tasks[2]["round"] == 1
    for token, task, mean in zip(
        (tokens[0], tokens[2]), (tasks[0], tasks[2]), (1.0, 3.0), strict=True
    ):
        reply = client.post(
            task["upload_url"], data=statistics_body(600, mean), headers=auth(token)
        )
        assert reply.status_code == 200, reply.json
    assert coordinator.settle()
    state = global_model(client)
    assert torch.allclose(state["blocks.2.norm.running_mean"], torch.full((256,), 2.0))
    assert client.get("/v1/health").json["done"]


def test_a_restart_while_a_published_versions_statistics_are_open_continues_it(make_app, tmp_path):
    from coordinator_helpers import statistics_body

    config = buffered(tmp_path, statistics=StatisticsClients.round, rounds=2)
    first_app = make_app(config)
    first = first_app.test_client()
    tokens = register(first)
    assert first_app.extensions["heterofl"].settle()
    assert upload(first, tokens[0], 1, constant_update(1.0, 1.0), ALL).status_code == 200
    assert upload(first, tokens[2], 1, constant_update(0.0625, 2.0), ALL).status_code == 200
    assert first_app.extensions["heterofl"].settle()
    first_app.extensions["heterofl"].close()  # version 1 published, its statistics open

    second_app = make_app(config)  # its folded updates' bytes are gone: it starts all the same
    second = second_app.test_client()
    coordinator = second_app.extensions["heterofl"]
    assert coordinator.settle()
    tasks = tasks_of(second, tokens)
    assert [(t["action"], t["round"]) for t in tasks] == [
        ("statistics", 1),
        ("train", 1),
        ("statistics", 1),
    ]
    for token, task in ((tokens[0], tasks[0]), (tokens[2], tasks[2])):
        reply = second.post(task["upload_url"], data=statistics_body(600, 1.0), headers=auth(token))
        assert reply.status_code == 200, reply.json
    assert coordinator.settle()
    history = second.get("/v1/rounds").json["rounds"]
    assert history[0]["state"] == "finished" and history[0]["metrics"]["uploads"] == 2
    # Units 0..3: the average of a's 1 and e's 2; the rest: a's alone.
    assert torch.equal(global_model(second)[BIAS], torch.tensor([1.5] * 4 + [1.0] * 60))
