"""The coordinator through Flask's test client on a fake clock: rounds, restarts, faults.

The round engine runs on the coordinator's worker thread; ``coordinator.settle()``
returns once it has handled everything the test did (no sleeps).
"""

from __future__ import annotations

import sqlite3
import threading

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
    statistics_body,
    upload,
)
from safetensors.torch import load

from coordinator.errors import ErrorCode
from coordinator.policy import (
    DeviceProfile,
    LevelCost,
    LevelTable,
    choose_rate,
    relevel,
)
from coordinator.store import StateError
from heterofl_edge.errors import ConfigError

EXPECTED_HIDDEN = torch.tensor([3.0] * 4 + [1.5] * 12 + [1.0] * 48)  # widths e=4, c=16, a=64


def tasks_of(client, tokens):
    return [client.get("/v1/task", headers=auth(t)).json for t in tokens]


def train_round_with_known_updates(client, tokens):
    """Devices a, c, e (Fix a1-c1-e1) upload 1s, 2s and 6s; e holds labels 0 and 1 only."""
    tasks = tasks_of(client, tokens)
    assert [t["action"] for t in tasks] == ["train"] * 3
    assert [t["level"] for t in tasks] == ["a", "c", "e"]
    for token, task, value, labels in zip(
        tokens, tasks, (1, 2, 6), (list(range(10)), list(range(10)), [0, 1]), strict=True
    ):
        weights = load(client.get(task["weights_url"], headers=auth(token)).data)
        assert weights["blocks.0.conv.bias"].shape == (
            ARCH.spec["blocks.0.conv.bias"].dims[0].size(task["rate"]),
        )
        reply = upload(client, token, task["round"], constant_update(task["rate"], value), labels)
        assert reply.status_code == 200, reply.json
    return tasks


def report_statistics(client, tokens):
    """The three devices report moments: count 600 each, means 1, 3, 0, variance 1."""
    for token, mean in zip(tokens, (1.0, 3.0, 0.0), strict=True):
        task = client.get("/v1/task", headers=auth(token)).json
        assert task["action"] == "statistics" and task["expected_count"] == 600
        reply = client.post(
            task["upload_url"], data=statistics_body(600, mean), headers=auth(token)
        )
        assert reply.status_code == 200, reply.json


def test_a_whole_round_merges_known_uploads_exactly(client, coordinator):
    tokens = register(client)
    assert coordinator.settle()
    train_round_with_known_updates(client, tokens)
    assert coordinator.settle()
    state = global_model(client)  # the model is published after statistics, not before
    assert not torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)

    task = client.get("/v1/task", headers=auth(tokens[0])).json
    assert task["action"] == "statistics" and task["level"] == "a"
    weights = load(client.get(task["weights_url"], headers=auth(tokens[0])).data)
    assert weights["blocks.3.conv.weight"].shape == (512, 256, 3, 3)
    assert torch.equal(weights["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    # Classifier: rows 0, 1 from a, c, e; rows 2..9 from a and c only (e lacks those labels).
    assert torch.equal(weights["classifier.bias"], torch.tensor([3.0, 3.0] + [1.5] * 8))
    row = torch.tensor([3.0] * 32 + [1.5] * 96 + [1.0] * 384)
    assert torch.equal(weights["classifier.weight"][0], row)

    report_statistics(client, tokens)
    assert coordinator.settle()
    state = global_model(client)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    # mean = (1 + 3 + 0) / 3; var = 1 + ((1 - 4/3)^2 + (3 - 4/3)^2 + (4/3)^2) / 3
    assert torch.allclose(state["blocks.2.norm.running_mean"], torch.full((256,), 4 / 3))
    assert torch.allclose(state["blocks.2.norm.running_var"], torch.full((256,), 1 + 14 / 9))
    history = client.get("/v1/rounds").json["rounds"]
    first = history[0]
    assert first["state"] == "finished" and first["uploads"] == 3
    assert first["metrics"]["statistics_reports"] == 3
    assert first["metrics"]["levels"] == {"a": 1, "c": 1, "e": 1}
    assert first["finished_at"] >= first["closed_at"] >= first["opened_at"]
    assert history[1]["state"] == "training"  # round 2 opened at once


def test_a_restart_in_the_middle_of_a_round_resumes_it(make_app):
    first_app = make_app()
    first = first_app.test_client()
    tokens = register(first)
    first_app.extensions["heterofl"].settle()
    tasks = tasks_of(first, tokens)
    assert upload(first, tokens[0], 1, constant_update(1.0, 1), list(range(10))).status_code == 200
    first_app.extensions["heterofl"].close()

    second_app = make_app()  # a new process on the same state folder
    second = second_app.test_client()
    coordinator = second_app.extensions["heterofl"]
    assert coordinator.settle()
    assert second.get("/v1/task", headers=auth(tokens[0])).json["action"] == "wait"  # a's kept
    assert_error(
        upload(second, tokens[0], 1, constant_update(1.0, 1)), 409, ErrorCode.duplicate_upload
    )
    upload(second, tokens[1], 1, constant_update(tasks[1]["rate"], 2), list(range(10)))
    upload(second, tokens[2], 1, constant_update(tasks[2]["rate"], 6), [0, 1])
    assert coordinator.settle()
    report_statistics(second, tokens)
    assert coordinator.settle()
    state = global_model(second)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    assert torch.equal(state["classifier.bias"], torch.tensor([3.0, 3.0] + [1.5] * 8))


def test_a_restart_in_the_statistics_phase_resumes_it(make_app):
    first_app = make_app()
    first = first_app.test_client()
    tokens = register(first)
    first_app.extensions["heterofl"].settle()
    train_round_with_known_updates(first, tokens)
    first_app.extensions["heterofl"].settle()
    task = first.get("/v1/task", headers=auth(tokens[0])).json
    first.post(task["upload_url"], data=statistics_body(600, 1.0), headers=auth(tokens[0]))
    first_app.extensions["heterofl"].close()

    second_app = make_app()
    second = second_app.test_client()
    coordinator = second_app.extensions["heterofl"]
    assert coordinator.settle()
    for token, mean in zip(tokens[1:], (3.0, 0.0), strict=True):
        task = second.get("/v1/task", headers=auth(token)).json
        assert task["action"] == "statistics"
        second.post(task["upload_url"], data=statistics_body(600, mean), headers=auth(token))
    assert coordinator.settle()
    state = global_model(second)
    assert torch.equal(state["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    assert torch.allclose(state["blocks.2.norm.running_mean"], torch.full((256,), 4 / 3))


def test_deadline_with_quorum_closes_the_round_and_records_who_missed_it(
    client, coordinator, clock
):
    tokens = register(client)
    assert coordinator.settle()
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    assert upload(client, tokens[1], 1, constant_update(0.25, 2)).status_code == 200
    client.get("/v1/task", headers=auth(tokens[2]))  # device e is alive, but slow
    assert coordinator.settle()
    assert client.get("/v1/rounds").json["rounds"][0]["state"] == "training"  # it waits for e
    clock.advance(61)
    assert coordinator.settle()
    late = upload(client, tokens[2], 1, constant_update(0.0625, 6))
    assert_error(late, 409, ErrorCode.round_closed)
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["metrics"]["timed_out"] == 1
    assert [a["status"] for a in history[0]["assignments"] if a["level"] == "e"] == ["missed"]
    weights = load(client.get("/v1/rounds/1/weights", headers=auth(tokens[0])).data)
    assert torch.equal(weights["blocks.0.conv.bias"], torch.tensor([1.5] * 16 + [1.0] * 48))


def test_deadline_without_quorum_fails_the_round_and_keeps_the_model(client, coordinator, clock):
    tokens = register(client)
    assert coordinator.settle()
    before = global_model(client)
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    clock.advance(61)
    assert coordinator.settle()
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["state"] == "failed" and "quorum" in history[0]["metrics"]["reason"]
    after = global_model(client)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert history[1]["state"] == "training"


@pytest.mark.parametrize("held", ["aggregation", "evaluation"])
def test_polls_answer_while_the_round_closes(make_app, tmp_path, monkeypatch, held):
    """The worker is stopped inside aggregation or evaluation; requests still answer."""
    entered, release = threading.Event(), threading.Event()

    def hold(*args, **kwargs):
        entered.set()
        assert release.wait(60)
        return {"global_accuracy": 0.5} if held == "evaluation" else finalize(*args, **kwargs)

    from heterofl_edge.aggregation import HeteroFLAggregator

    finalize = HeteroFLAggregator.finalize
    if held == "aggregation":
        monkeypatch.setattr(HeteroFLAggregator, "finalize", hold)
        app = make_app()
    else:
        app = make_app(start=False)
        app.extensions["heterofl"].engine.evaluate = hold
        app.extensions["heterofl"].start()
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    train_round_with_known_updates(client, tokens)
    if held == "evaluation":
        assert coordinator.settle()
        report_statistics(client, tokens)
    assert entered.wait(60)
    try:
        for token in tokens:
            assert client.get("/v1/task", headers=auth(token)).json["action"] == "wait"
        assert client.get("/v1/rounds").json["rounds"][0]["uploads"] == 3
        assert client.get("/v1/health").json["round"] == 1
        assert client.get("/v1/devices").json["devices"][0]["state"] == "online"
    finally:
        release.set()
    assert coordinator.settle()
    assert client.get("/v1/task", headers=auth(tokens[0])).json["action"] in ("statistics", "train")


def test_a_silent_device_is_not_waited_for_and_not_selected(make_app, clock):
    app = make_app(device_timeout=30.0)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    clock.advance(31)  # past the 30 s device timeout: the third device never polled again
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    assert upload(client, tokens[1], 1, constant_update(0.25, 2)).status_code == 200
    assert coordinator.settle()
    history = client.get("/v1/rounds").json["rounds"]
    assert history[0]["state"] in ("statistics", "finished")  # closed without the deadline
    assert history[0]["metrics"] == {} or history[0]["metrics"]["timed_out"] == 1
    devices = {d["device_id"]: d["state"] for d in client.get("/v1/devices").json["devices"]}
    assert sorted(devices.values()).count("offline") == 1
    for token in tokens[:2]:
        task = client.get("/v1/task", headers=auth(token)).json
        if task["action"] == "statistics":
            client.post(task["upload_url"], data=statistics_body(600, 1.0), headers=auth(token))
    assert coordinator.settle()
    second = client.get("/v1/rounds").json["rounds"][1]
    assert second["state"] == "training"
    silent = next(i for i, s in devices.items() if s == "offline")
    assert silent not in {a["device_id"] for a in second["assignments"]}
    assert len(second["assignments"]) == 2


def test_a_device_that_keeps_beating_outlasts_the_timeout_and_a_silent_one_is_dropped(
    make_app, clock
):
    """Training longer than --device-timeout: heartbeats keep a device in the round."""
    app = make_app(device_timeout=30.0, round_seconds=600.0)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    tasks = tasks_of(client, tokens)
    assert {t["heartbeat_seconds"] for t in tasks} == {5.0}  # a sixth of the timeout
    for token, task in zip(tokens[:2], tasks[:2], strict=True):  # a and c start training
        assert client.get(task["weights_url"], headers=auth(token)).status_code == 200
    assert upload(client, tokens[2], 1, constant_update(0.0625, 6), [0, 1]).status_code == 200
    for _ in range(24):  # two minutes, four device timeouts: a beats, c has gone quiet
        clock.advance(5)
        beat = client.post("/v1/heartbeat", headers=auth(tokens[0]))
        assert beat.status_code == 200 and beat.json["state"] == "training"
        assert coordinator.settle()
    states = {d["device_id"]: d["state"] for d in client.get("/v1/devices").json["devices"]}
    beating, silent = (coordinator.registry.all()[i].id for i in (0, 1))
    assert states[beating] == "training" and states[silent] == "offline"
    (open_round,) = client.get("/v1/rounds").json["rounds"]
    assert open_round["state"] == "training"  # the round waits for the beating device
    assert upload(client, tokens[0], 1, constant_update(1.0, 1), list(range(10))).status_code == 200
    assert coordinator.settle()
    (closed,) = client.get("/v1/rounds").json["rounds"][:1]
    status = {a["device_id"]: a["status"] for a in closed["assignments"]}
    assert status[beating] == "uploaded" and status[silent] == "missed"
    assert closed["uploads"] == 2 and closed["state"] == "statistics"


def test_a_late_device_takes_the_next_rounds_task(make_app, clock):
    app = make_app(device_timeout=30.0)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    task = client.get("/v1/task", headers=auth(tokens[2])).json
    client.get(task["weights_url"], headers=auth(tokens[2]))
    upload(client, tokens[0], 1, constant_update(1.0, 1))
    upload(client, tokens[1], 1, constant_update(0.25, 2))
    for _ in range(2):
        clock.advance(20)
        for token in tokens:  # all alive; the third is still training
            client.get("/v1/task", headers=auth(token))
    clock.advance(21)  # the deadline passes
    assert coordinator.settle()
    late = upload(client, tokens[2], 1, constant_update(0.0625, 6))
    assert_error(late, 409, ErrorCode.round_closed)
    devices = {d["device_id"]: d["state"] for d in client.get("/v1/devices").json["devices"]}
    assert "late" in devices.values()
    for token in tokens[:2]:
        stats_task = client.get("/v1/task", headers=auth(token)).json
        client.post(stats_task["upload_url"], data=statistics_body(600, 0.0), headers=auth(token))
    assert coordinator.settle()
    nxt = client.get("/v1/task", headers=auth(tokens[2])).json
    assert nxt["action"] == "train" and nxt["round"] == 2


def test_a_failing_evaluation_is_a_server_fault_and_the_run_goes_on(make_app, tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    app = make_app(data_dir=empty)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    tokens = register(client)
    assert coordinator.settle()
    train_round_with_known_updates(client, tokens)
    assert coordinator.settle()
    report_statistics(client, tokens)
    assert coordinator.settle()
    first = client.get("/v1/rounds").json["rounds"][0]
    assert first["state"] == "finished" and "evaluation failed" in first["metrics"]["reason"]
    assert torch.equal(global_model(client)["blocks.0.conv.bias"], EXPECTED_HIDDEN)
    tasks = tasks_of(client, tokens)
    assert [t["action"] for t in tasks] == ["train"] * 3 and tasks[0]["round"] == 2


def test_a_storage_fault_is_a_503_and_nothing_is_kept(client, coordinator, monkeypatch):
    from coordinator.store import Store

    tokens = register(client)
    assert coordinator.settle()
    accept = Store.accept
    calls = []

    def full_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return accept(self, *args, **kwargs)

    monkeypatch.setattr(Store, "accept", full_disk)
    assert_error(
        upload(client, tokens[0], 1, constant_update(1.0, 1)), 503, ErrorCode.storage_error
    )
    assert client.get("/v1/rounds").json["rounds"][0]["uploads"] == 0
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200  # retried


def test_profile_levels_move_down_after_a_slow_round_and_up_after_fast_ones():
    levels = [
        LevelCost(1.0, 80_000_000, 6_000_000),
        LevelCost(0.25, 5_000_000, 400_000),
        LevelCost(0.0625, 400_000, 26_000),
    ]
    table = LevelTable(slow_fraction=0.8, fast_fraction=0.5, fast_rounds=2)
    assert relevel(1.0, None, 60, 0, levels, table) == (0.25, 0)  # missed the deadline
    assert relevel(1.0, 50, 60, 0, levels, table) == (0.25, 0)  # finished too close to it
    assert relevel(0.0625, 55, 60, 0, levels, table) == (0.0625, 0)  # already the smallest
    assert relevel(0.25, 40, 60, 0, levels, table) == (0.25, 0)  # fine where it is
    # 1 s at c projects to 16 s at a (< 30 s): up after two such rounds in a row, not one
    assert relevel(0.25, 1, 60, 0, levels, table) == (0.25, 1)
    assert relevel(0.25, 1, 60, 1, levels, table) == (1.0, 0)
    # hysteresis: at a, 35 s is neither slow (> 48 s) nor a reason to move
    assert relevel(1.0, 35, 60, 0, levels, table) == (1.0, 0)


def test_profile_policy_relevels_devices_from_their_measured_round_times(make_app, clock):
    app = make_app(policy="profile", mode="a-c-e", min_devices=2, min_uploads=1, rounds=4)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    fast = {**PROFILE, "step_ms": 0.05, "num_examples": 600}  # a: 0.05 * 200 * 300 = 3 s
    slow = {**PROFILE, "step_ms": 0.5, "num_examples": 600}  # a: 30 s > 30 s budget; c: 1.9 s
    tokens = [client.post("/v1/devices", json=p).json["token"] for p in (fast, slow)]
    assert coordinator.settle()
    levels = []
    for seconds in ((55, 1), (1, 1), (1, 1)):  # the fast device is slow once, then fast
        tasks = tasks_of(client, tokens)
        levels.append([t["level"] for t in tasks])
        for token, task in zip(tokens, tasks, strict=True):
            client.get(task["weights_url"], headers=auth(token))
        for token, task, took in sorted(
            zip(tokens, tasks, seconds, strict=True), key=lambda x: x[2]
        ):
            clock.advance(took)
            reply = upload(client, token, task["round"], constant_update(task["rate"], 1))
            assert reply.status_code == 200, reply.json
            clock.advance(-took)  # both started at the same time
        clock.advance(max(seconds))
        assert coordinator.settle()
        for token in tokens:
            task = client.get("/v1/task", headers=auth(token)).json
            client.post(task["upload_url"], data=statistics_body(600, 0.0), headers=auth(token))
        assert coordinator.settle()
    # fast: a, then c (55 s > 0.8 x 60 s), then a again after two fast rounds at c
    # slow: c; 1 s at c projects to 16 s at a (< 30 s): a after two fast rounds
    assert levels == [["a", "c"], ["c", "c"], ["c", "a"]]
    assert tasks_of(client, tokens)[0]["level"] == "a"


def test_profile_policy_picks_the_largest_level_that_fits():
    levels = [
        LevelCost(1.0, 80_000_000, 6_000_000),
        LevelCost(0.25, 5_000_000, 400_000),
        LevelCost(0.0625, 400_000, 26_000),
    ]
    table = LevelTable(budget_fraction=0.5, steps_per_round=300, memory_factor=8)
    fast = DeviceProfile(step_ms=2, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=100)
    # budget 0.5 x 120 s; a: 2 ms * 200 * 300 = 120 s; c: 2 ms * 12.5 * 300 = 7.5 s -> c
    assert choose_rate(fast, levels, table, 120, 5, 10) == 0.25
    faster = DeviceProfile(step_ms=0.5, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=100)
    assert choose_rate(faster, levels, table, 120, 5, 10) == 1.0  # 30 s + 1 s transfer
    counted = DeviceProfile(0.5, 0.0625, 4096, 100, num_examples=6000)  # 5 x 600 steps: 300 s
    assert choose_rate(counted, levels, table, 120, 5, 10) == 0.25
    tiny_memory = DeviceProfile(step_ms=0.5, reference_rate=0.0625, memory_mb=1, bandwidth_mbps=100)
    with pytest.raises(ConfigError, match="fits no level") as refused:  # memory is a hard limit
        choose_rate(tiny_memory, levels, table, 120, 5, 10)
    assert refused.value.code == "insufficient_memory"
    # 50 MB: c (16 MB + 8 x 0.38 MB; a's statistics 16 + 2 x 5.7) fits, a (16 + 8 x 5.7) does not
    small = DeviceProfile(step_ms=0.5, reference_rate=0.0625, memory_mb=50, bandwidth_mbps=100)
    assert choose_rate(small, levels, table, 120, 5, 10) == 0.25
    slow_link = DeviceProfile(
        step_ms=0.5, reference_rate=0.0625, memory_mb=4096, bandwidth_mbps=0.5
    )
    assert choose_rate(slow_link, levels, table, 120, 5, 10) == 0.25  # a's 12 MB each way: 192 s


def test_state_dir_of_another_run_or_version_is_refused(make_app, tmp_path):
    make_app(make_config(tmp_path / "s"))
    with pytest.raises(Exception, match="holds a run of conv, a1-c1-e1, fix"):
        make_app(make_config(tmp_path / "s", mode="a-e", policy="dynamic"))
    old = tmp_path / "old"
    old.mkdir()
    db = sqlite3.connect(old / "coordinator.sqlite3")
    db.execute("CREATE TABLE devices (id TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="another version of heterofl-edge"):
        make_app(make_config(old))


def test_artifacts_are_built_by_the_coordinator_never_by_a_request(make_app, tmp_path):
    import hashlib

    app = make_app(make_config(tmp_path / "s", mode="e", artifact_verify=False), start=False)
    client = app.test_client()
    assert_error(client.get("/v1/artifacts/conv/e/manifest.json"), 503, ErrorCode.not_ready)
    assert not (tmp_path / "s" / "artifacts" / "conv-e").exists()  # the request built nothing
    coordinator = app.extensions["heterofl"]
    coordinator.artifacts.build_all()
    with client.get("/v1/artifacts/conv/e/manifest.json") as reply:
        assert reply.status_code == 200
        manifest = reply.json
    assert manifest["level"] == "e"
    with client.get("/v1/artifacts/conv/e/onnx/train_step.onnx") as reply:
        assert reply.status_code == 200
        digest = reply.headers["X-Content-SHA256"]
        assert digest == hashlib.sha256(reply.data).hexdigest()
    assert digest == manifest["files"]["onnx/train_step.onnx"]["sha256"]
    for path in ("onnx/..%2Fmanifest.json", "onnx/nothing.onnx"):
        assert client.get(f"/v1/artifacts/conv/e/{path}").status_code in (400, 404)
    assert_error(client.get("/v1/artifacts/conv/b/manifest.json"), 404, ErrorCode.not_found)
    assert_error(client.get("/v1/artifacts/resnet18/e/manifest.json"), 404, ErrorCode.not_found)


def test_demo_shards_come_from_the_runs_data_set_shaped_for_its_model(
    make_app, tmp_path, mnist_dir
):
    """--demo-data with --data imagefolder and resnet18: browser shards are 3x32x32 images."""
    from image_helpers import write_mnist_as_images

    write_mnist_as_images(mnist_dir, tmp_path / "digits", train=40, test=10)
    app = make_app(
        model="resnet18", mode="e", data="imagefolder", demo_data_dir=tmp_path / "digits"
    )
    client = app.test_client()
    assert client.get("/v1/health").get_json()["demo_data"] is True
    shards = []
    for shard in range(2):
        reply = client.get(f"/v1/demo-data?shard={shard}&clients=2&split=iid&seed=0")
        assert reply.status_code == 200, reply.data[:200]
        shards.append(load(reply.data))
    assert all(tuple(s["x"].shape[1:]) == (3, 32, 32) for s in shards)
    assert sum(len(s["y"]) for s in shards) == 40  # the two shards share the folder's images
    from heterofl_edge.data.image_arrays import read_image_folder

    folder = read_image_folder(tmp_path / "digits", test=False)
    assert sorted(torch.cat([s["y"] for s in shards]).tolist()) == sorted(folder.train_y.tolist())


def test_held_out_evaluation_scores_the_examples_simulate_scores(mnist_dir):
    """serve --test-examples N and simulate --test-examples N score one subset for one seed."""
    from coordinator.evaluation import HeldOutEvaluation
    from heterofl_edge.data.registry import get_dataset
    from heterofl_edge.models import get_architecture
    from heterofl_edge.partition import Split
    from heterofl_edge.tasks import task_for

    arch = get_architecture("conv")
    torch.manual_seed(0)
    model = arch.build(0.0625, 0.0625)
    data = get_dataset("mnist", mnist_dir, fit_to=arch.input_shape)
    task = task_for(arch)
    keep = torch.from_numpy(task.split(data, 10, Split.iid, 7, test_examples=300).test_keep)
    expected = task.evaluate(model, data.test_x[keep], data.test_y[keep])

    scores = HeldOutEvaluation(arch, 0.0625, mnist_dir, 300, "mnist", seed=7)(model.state_dict())
    assert scores["test_examples"] == 300
    assert scores["global_loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert scores["global_accuracy"] == pytest.approx(expected.accuracy, abs=1e-12)
    first = HeldOutEvaluation(arch, 0.0625, mnist_dir, 300, "mnist", seed=8)(model.state_dict())
    assert first["global_loss"] != pytest.approx(expected.loss, rel=1e-6)  # the seed chooses
