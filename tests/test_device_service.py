"""A device that runs as a service: kept registration, back-off, memory limit, systemd unit.

* ``--state-dir`` keeps the device's identity and token (mode 0600, written
  atomically): a device killed with SIGKILL and started again continues under
  the same id and still uploads for the round it was selected for; a refused
  token registers again; a state folder that is not a device's, or a
  registration with another coordinator run, is refused in one line.
* The client's back-off is jittered, grows, is capped, never hot-loops, and
  logs one line when the coordinator goes away and one when it is back; a
  device started before its coordinator registers once it comes up.
* ``--max-memory-mb``: the coordinator refuses a device whose memory fits no
  level (``insufficient_memory``) and never gives one a level above its
  memory, under the profile, Fix and Dynamic policies.
* ``device install-service`` writes a unit that ``systemd-analyze verify``
  accepts (where systemd is installed; field by field where it is not).
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from coordinator_helpers import PROFILE, assert_error, auth

from coordinator.errors import ErrorCode
from coordinator.policy import LevelCost, LevelTable, MemoryCappedLevels, ProfileLevels
from coordinator.process import free_port, start_coordinator, stop
from device_sim.backoff import Backoff
from device_sim.device import chunked_statistics
from device_sim.protocol import CoordinatorClient, ProtocolError
from device_sim.state import DeviceIdentity, StateDir, new_identity
from heterofl_edge.engine import Client, Outcome
from heterofl_edge.errors import ConfigError
from heterofl_edge.strategy import ClientTask, RoundPlan

REPO = Path(__file__).resolve().parents[1]


class Highest(random.Random):
    """Every draw at the top of its range: the back-off's ceilings."""

    def uniform(self, a, b):
        return b


class Lowest(random.Random):
    """Every draw at the bottom of its range: what keeps a device out of a hot loop."""

    def uniform(self, a, b):
        return a


# -- back-off -------------------------------------------------------------------------------


def test_the_backoff_grows_is_capped_jittered_and_never_hot():
    ceilings = Backoff(base=0.25, cap=10.0, rng=Highest())
    assert [ceilings.next() for _ in range(9)] == [0.25, 0.5, 1, 2, 4, 8, 10, 10, 10]
    floor = Backoff(base=0.25, cap=10.0, rng=Lowest())
    assert [floor.next() for _ in range(5)] == [0.25] * 5  # never below the floor

    seeded = Backoff(base=0.25, cap=10.0, rng=random.Random(7))
    waits = [seeded.next() for _ in range(40)]
    again = Backoff(base=0.25, cap=10.0, rng=random.Random(7))
    assert [again.next() for _ in range(40)] == waits  # a seeded source: the same waits
    bounds = [min(10.0, 0.25 * 2**n) for n in range(40)]
    assert all(0.25 <= w <= b for w, b in zip(waits, bounds, strict=True))
    assert len(set(waits[6:])) > 30  # jittered: capped waits still differ
    assert sum(waits[20:]) / 20 > 3 * sum(waits[:4]) / 4  # they grow
    seeded.reset()
    assert seeded.ceiling() == 0.25
    with pytest.raises(ValueError, match="base <= cap"):
        Backoff(base=5, cap=1)


def test_a_retry_streak_is_logged_once_when_it_starts_and_once_when_it_ends(tmp_path):
    waits, lines = [], []
    client = CoordinatorClient(
        "http://127.0.0.1:9", tmp_path, sleep=waits.append, rng=Highest(), log=lines.append
    )
    replies: list = [requests.ConnectionError("[Errno 111] Connection refused")] * 4
    ready = requests.Response()
    ready.status_code, ready._content = 200, json.dumps({"ok": True}).encode()
    replies.append(ready)

    def request(method, url, **kwargs):
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    client._session.request = request
    assert client._request("GET", "/v1/health").json() == {"ok": True}
    assert waits == [0.25, 0.5, 1.0, 2.0]
    assert lines == [
        "coordinator unavailable (connection refused); retrying with back-off (at most 10 s apart)",
        "coordinator back after 4 s",
    ]


# -- the state folder -------------------------------------------------------------------------


def identity(run_id="0" * 32, url="http://127.0.0.1:8080") -> DeviceIdentity:
    return new_identity("dev1", "s3cret-token", url, run_id, 0.5, 5.0, 0.25, "c", {})


def test_the_identity_is_written_atomically_with_mode_0600_and_never_shows_its_token(tmp_path):
    state = StateDir(tmp_path / "state")
    assert state.load() is None
    mine = identity()
    state.save(mine)
    assert stat.S_IMODE((tmp_path / "state" / "device.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert state.load() == mine
    assert "s3cret" not in repr(mine) and "s3cret" not in str(mine)

    def crash(src, dst):
        raise OSError("disk unplugged")

    newer = identity(run_id="1" * 32)
    original = os.replace
    os.replace = crash
    try:
        with pytest.raises(OSError, match="unplugged"):
            state.save(newer)
    finally:
        os.replace = original
    assert state.load() == mine  # the old identity, whole
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["device.json"]


def private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda p: p.write_text("x"), "is a file, not a folder"),
        (
            lambda p: (p.mkdir(), (p / "coordinator.sqlite3").write_text("")),
            "is a coordinator's state folder: it holds coordinator.sqlite3",
        ),
        (
            lambda p: (p.mkdir(), (p / "notes.txt").write_text(""), (p / "photos").mkdir()),
            "is not a device's state folder: it holds notes.txt, photos",
        ),
        (lambda p: (p.mkdir(), private(p / "device.json", "{")), "is not a heterofl-edge"),
        (
            lambda p: (p.mkdir(), private(p / "device.json", '{"format": 1}')),
            "its 'device_id' is missing",
        ),
        (
            lambda p: (p.mkdir(), (p / "device.json").write_text("{}")),
            "others may read it (mode 0644)",
        ),
    ],
)
def test_a_state_folder_that_is_not_this_devices_is_refused(tmp_path, prepare, message):
    path = tmp_path / "state"
    prepare(path)
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        StateDir(path).load()
    assert "\n" not in str(refused.value)  # one line


def test_a_state_folder_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be created: Not a directory"):
        StateDir(tmp_path / "file" / "state")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_unwritable_state_folder_is_refused(tmp_path):
    path = tmp_path / "state"
    path.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not writable"):
        StateDir(path)


def test_a_registration_with_another_coordinator_run_is_refused(tmp_path):
    state = StateDir(tmp_path / "state")
    mine = identity(run_id="a" * 32, url="http://laptop:8080")
    state.check_run(mine, "http://192.168.1.7:8080", "a" * 32)  # the same run, moved: fine
    with pytest.raises(ConfigError, match=r"holds device dev1 of run a{32} at http://laptop:8080"):
        state.check_run(mine, "http://laptop:8080", "b" * 32)
    no_run = identity(run_id=None, url="http://laptop:8080")
    state.check_run(no_run, "http://laptop:8080/", None)  # an older coordinator: by its URL
    with pytest.raises(ConfigError, match="serves a coordinator without a run id"):
        state.check_run(no_run, "http://other:8080", None)


# -- memory: the device's side ---------------------------------------------------------------


class MomentsLevel:
    """A stand-in runtime whose statistics program reports per-feature moments of ``x``.

    ``fixed`` mimics an ExecuTorch program's fixed batch: a short tail is skipped.
    """

    def __init__(self, fixed: int | None = None) -> None:
        self.manifest = {"bn_layers": ["one", "two"]}
        self.fixed = fixed
        self.calls: list[int] = []

    def statistics(self, weights, x):
        self.calls.append(len(x))
        if self.fixed is not None:
            x = x[: len(x) // self.fixed * self.fixed]
        out = {}
        for i, layer in enumerate(self.manifest["bn_layers"]):
            features = x.astype(np.float64) * (i + 1) if len(x) else np.zeros((1, x.shape[1]))
            out[f"{layer}.count"] = np.array(float(len(x)), np.float32)
            out[f"{layer}.mean"] = features.mean(axis=0).astype(np.float32)
            out[f"{layer}.var"] = features.var(axis=0).astype(np.float32)
        return out


def test_statistics_in_small_batches_equal_the_whole_pass():
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(103, 4)).astype(np.float32)
    whole = MomentsLevel().statistics({}, x)
    level = MomentsLevel()
    chunked = chunked_statistics(level, {}, x, 10)
    assert level.calls == [10] * 10 + [3]  # at most 10 examples in memory at once
    assert set(chunked) == set(whole)
    for name, value in whole.items():
        np.testing.assert_allclose(chunked[name], value, rtol=1e-5, atol=1e-5)
        assert chunked[name].dtype == value.dtype and chunked[name].shape == value.shape
    fixed = MomentsLevel(fixed=10)  # a fixed-batch program: only the last chunk's tail is lost
    assert float(chunked_statistics(fixed, {}, x, 20)["one.count"]) == 100.0


# -- memory: the coordinator's side -----------------------------------------------------------

SMALL = {**PROFILE, "memory_mb": 100}  # conv: c and e fit, a (about 147 MB) does not
BIG = {**PROFILE, "memory_mb": 4096}


def test_a_device_whose_memory_fits_no_level_is_refused_and_leaves_nothing(make_app):
    app = make_app(mode="a-c-e")
    client = app.test_client()
    tight = {**PROFILE, "memory_mb": 300, "base_memory_mb": 290}
    reply = client.post("/v1/devices", json=tight)
    assert_error(reply, 400, ErrorCode.insufficient_memory)
    body = reply.json
    assert body["message"] == (
        "a memory limit of 300 MB (290 MB of it held by the device's process) fits no level of "
        "mode a1-c1-e1: the smallest, e, needs about 49 MB more than the process"
    )
    assert (
        body["hint"] == "raise the device's --max-memory-mb to at least 339, or run smaller levels"
    )
    assert client.get("/v1/devices").json["devices"] == []
    small = client.post("/v1/devices", json=SMALL).json
    assert (small["max_level"], small["max_rate"]) == ("c", 0.25)
    assert client.post("/v1/devices", json=BIG).json["max_level"] == "a"


def test_fix_and_dynamic_draws_never_exceed_a_devices_memory(make_app):
    app = make_app(policy="dynamic", mode="a-c-e", min_devices=8, rounds=1)
    client, coordinator = app.test_client(), app.extensions["heterofl"]
    profiles = [SMALL, BIG] * 4
    replies = [client.post("/v1/devices", json=p).json for p in profiles]
    coordinator.settle()
    plan = coordinator.engine.strategy.configure_round(1, list(range(8)), 8)
    drawn = [rate for _, rate in sorted((t.client_id, t.rate) for t in plan.tasks)]  # by position
    tasks = [client.get("/v1/task", headers=auth(r["token"])).json for r in replies]
    caps = [r["max_rate"] for r in replies]
    assert [t["rate"] for t in tasks] == [min(d, c) for d, c in zip(drawn, caps, strict=True)]
    assert any(d == 1.0 for d, p in zip(drawn, profiles, strict=True) if p is SMALL)
    assert all(t["level"] != "a" for t, p in zip(tasks, profiles, strict=True) if p is SMALL)
    assert any(t["level"] == "a" for t, p in zip(tasks, profiles, strict=True) if p is BIG)


def test_the_policies_cap_by_memory_and_relevelling_never_goes_above_it():
    plan = RoundPlan(
        1, 0.01, (ClientTask(0, 1.0, 1), ClientTask(1, 1.0, 2), ClientTask(2, 0.0625, 3))
    )
    chosen = [Client("small", 0), Client("big", 1), Client("tiny", 2)]
    caps = {"small": 0.25, "big": 1.0, "tiny": 0.0625}
    assert MemoryCappedLevels(caps.__getitem__).rates(plan, chosen) == [0.25, 1.0, 0.0625]

    levels = [LevelCost(1.0, 80_000_000, 6_000_000), LevelCost(0.25, 5_000_000, 400_000)]
    moved: dict[str, float] = {}
    policy = ProfileLevels(
        levels, LevelTable(fast_rounds=1), lambda _d: 0.25, moved.update, cap_of=caps.__getitem__
    )
    fast = [Outcome("small", 0.25, 1.0, 60.0), Outcome("big", 0.25, 1.0, 60.0)]
    policy.observe(1, fast)  # both fast enough to move up; only the big one may
    assert moved == {"big": 1.0}


# -- install-service ---------------------------------------------------------------------------


def heterofl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heterofl_edge", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_install_service_writes_a_unit_that_systemd_accepts(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    out = heterofl(
        "device", "install-service", "--dry-run", "--name", "hfl-device", "--user", "hfl",
        "--max-memory-mb", "700", "--coordinator", "http://laptop.local:8080",
        "--data-dir", str(data), "--shard", "3", "--clients", "20", "--split", "non-iid",
        "--capabilities", '{"cpu_slowdown": 2}',
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit = out.stdout
    parsed = configparser.ConfigParser(strict=True, interpolation=None)
    parsed.optionxform = str  # systemd keys are case-sensitive
    parsed.read_string(unit)
    service = parsed["Service"]
    python = str(Path(sys.executable).absolute())
    assert service["ExecStart"] == (
        f"{python} -m heterofl_edge device --coordinator http://laptop.local:8080 "
        f"--data-dir {data} --shard 3 --clients 20 --split non-iid "
        '--capabilities "{\\"cpu_slowdown\\": 2}" --state-dir /var/lib/hfl-device '
        "--cache /var/cache/hfl-device --max-memory-mb 700"
    )
    expected = {
        "User": "hfl",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "MemoryMax": "700M",
        "MemorySwapMax": "0",
        "StandardOutput": "journal",
        "StandardError": "journal",
        "StateDirectory": "hfl-device",
        "StateDirectoryMode": "0700",
        "CacheDirectory": "hfl-device",
        "WorkingDirectory": "/var/lib/hfl-device",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert parsed["Install"]["WantedBy"] == "multi-user.target"
    assert parsed["Unit"]["After"] == "network-online.target"

    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): checked by field")
    unit_file = tmp_path / "hfl-device.service"
    unit_file.write_text(unit)
    checked = subprocess.run(
        [verify, "verify", str(unit_file)], capture_output=True, text=True, timeout=120
    )
    # verify exits 0 on settings it ignores, so its complaints must be absent too
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_install_service_keeps_the_enrollment_token_out_of_the_unit(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    out = heterofl(
        "device", "install-service", "--unit-dir", str(tmp_path / "units"),
        "--env-dir", str(tmp_path / "env"), "--max-memory-mb", "512",
        "--coordinator", "https://fl.example.org", "--data-dir", str(data),
        env={"HETEROFL_ENROLLMENT_TOKEN": "enrol-$ecret%"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit = (tmp_path / "units" / "heterofl-edge-device.service").read_text()
    env_file = tmp_path / "env" / "heterofl-edge-device.env"
    assert "ecret" not in unit and f"EnvironmentFile={env_file}" in unit
    assert env_file.read_text() == 'HETEROFL_ENROLLMENT_TOKEN="enrol-$ecret%"\n'
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "systemctl daemon-reload && systemctl enable --now heterofl-edge-device" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--data-dir", "/srv/mnist"],
            "the service needs the device's --coordinator and --data-dir",
        ),
        (
            ["--coordinator", "http://x", "--data-dir", "/d", "--shrad", "1"],
            "No such option: --shrad",
        ),
        (
            ["--coordinator", "http://x", "--data-dir", "/d", "--state-dir", "/tmp/s"],
            "install-service sets --state-dir itself",
        ),
        (["--name", "a b", "--coordinator", "http://x", "--data-dir", "/d"], "--name 'a b'"),
    ],
)
def test_install_service_refuses_bad_input_in_one_line(args, message):
    out = heterofl("device", "install-service", "--dry-run", *args)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert len(lines) <= 2 and all(line.startswith(("error: ", "hint: ")) for line in lines)


# -- real processes ------------------------------------------------------------------------------

SERVE = [
    "--mode", "e", "--policy", "fix", "--rounds", "1", "--fraction", "1", "--min-devices", "1",
    "--min-uploads", "1", "--local-epochs", "1", "--round-seconds", "600",
    "--stats-seconds", "600", "--device-timeout", "60", "--poll-seconds", "0.5",
    "--no-verify-artifacts",
]  # fmt: skip


def serve(tmp_path, artifact_cache, port=None, name="coordinator"):
    state = tmp_path / "state"
    artifact_cache(state, ("e",), global_rate=0.0625)
    return start_coordinator(
        [*SERVE, "--state-dir", str(state)], tmp_path / f"{name}.log", port=port
    )


def device_command(url, mnist_dir, state_dir, *extra):
    return [
        sys.executable, "-m", "heterofl_edge", "device", "--coordinator", url,
        "--data-dir", str(mnist_dir), "--train-examples", "200", "--state-dir", str(state_dir),
        *extra,
    ]  # fmt: skip


def wait_until(condition, what, timeout=120.0, process=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if process is not None and process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {timeout:.0f} s")
        time.sleep(0.1)


def device_in_state(url, state):
    devices = requests.get(f"{url}/v1/devices", timeout=10).json()["devices"]
    return next((d["device_id"] for d in devices if d["state"] == state), None)


@pytest.mark.slow
def test_a_device_killed_mid_round_resumes_as_itself_and_still_uploads(
    tmp_path, mnist_dir, artifact_cache
):
    process, url = serve(tmp_path, artifact_cache)
    device_state = tmp_path / "device"
    first_log, second_log = tmp_path / "device-1.log", tmp_path / "device-2.log"
    try:
        # Its first life trains, then sleeps as a 2000x slower CPU would: killed before uploading.
        slow = ["--capabilities", '{"cpu_slowdown": 2000}']
        with first_log.open("wb") as sink:
            first = subprocess.Popen(
                device_command(url, mnist_dir, device_state, *slow), stdout=sink, stderr=sink
            )
        device_id = wait_until(
            lambda: device_in_state(url, "training"), "a device training", 120, first, first_log
        )
        first.kill()  # SIGKILL: no goodbye
        first.wait()
        assert requests.get(f"{url}/v1/rounds", timeout=10).json()["rounds"][0]["uploads"] == 0

        with second_log.open("wb") as sink:
            second = subprocess.Popen(
                device_command(url, mnist_dir, device_state), stdout=sink, stderr=sink
            )
        assert second.wait(timeout=300) == 0, second_log.read_text()[-2000:]
        said = second_log.read_text()
        rounds = requests.get(f"{url}/v1/rounds", timeout=10).json()["rounds"]
        devices = requests.get(f"{url}/v1/devices", timeout=10).json()["devices"]
    finally:
        for child in ("first", "second"):
            running = locals().get(child)
            if running is not None and running.poll() is None:
                running.kill()
                running.wait()
        stop(process)
    assert f"resumed as {device_id}" in said and "registered as" not in said
    assert "round 1: trained level e" in said and "coordinator says done" in said
    assert [d["device_id"] for d in devices] == [device_id]  # no second registration
    (assignment,) = rounds[0]["assignments"]
    assert rounds[0]["state"] == "finished" and rounds[0]["uploads"] == 1
    assert (assignment["device_id"], assignment["status"]) == (device_id, "uploaded")
    assert assignment["metrics"]["peak_memory_mb"] > 10


@pytest.mark.slow
def test_a_device_started_before_its_coordinator_registers_when_it_comes_up(
    tmp_path, mnist_dir, artifact_cache
):
    port = free_port()
    device_state = tmp_path / "device"
    log = tmp_path / "device.log"
    process = None
    with log.open("wb") as sink:
        device = subprocess.Popen(
            device_command(f"http://127.0.0.1:{port}", mnist_dir, device_state),
            stdout=sink,
            stderr=sink,
        )
    try:
        wait_until(
            lambda: "coordinator unavailable (connection refused)" in log.read_text(),
            "the device waiting",
            120,
            device,
            log,
        )
        process, url = serve(tmp_path, artifact_cache, port=port)
        assert device.wait(timeout=300) == 0, log.read_text()[-2000:]
        run_id = requests.get(f"{url}/v1/health", timeout=10).json()["run_id"]
    finally:
        if device.poll() is None:
            device.kill()
            device.wait()
        if process is not None:
            stop(process)
    said = log.read_text()
    assert said.count("coordinator unavailable") == 1  # bounded: one line for the whole wait
    assert "coordinator back after" in said and "coordinator says done" in said
    stored = StateDir(device_state).load()
    assert stored is not None and stored.run_id == run_id
    assert f"registered as {stored.device_id}" in said
    assert stat.S_IMODE((device_state / "device.json").stat().st_mode) == 0o600


@pytest.mark.slow
def test_a_refused_token_registers_again_and_another_run_is_refused(
    tmp_path, mnist_dir, artifact_cache
):
    process, url = serve(tmp_path, artifact_cache)
    device_state = tmp_path / "device"
    try:
        run_id = requests.get(f"{url}/v1/health", timeout=10).json()["run_id"]
        settings = {"runtime": "onnx", "max_memory_mb": None}  # the device's, unchanged
        forgotten = new_identity(
            "gone", "forgotten-token", url, run_id, 0.5, 5.0, None, None, settings
        )
        StateDir(device_state).save(forgotten)  # as if the coordinator had lost its database
        out = subprocess.run(
            device_command(url, mnist_dir, device_state),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "resumed as gone" in out.stdout
        assert "token refused (unknown token); registering again" in out.stdout
        stored = StateDir(device_state).load()
        assert stored is not None and stored.device_id != "gone"

        StateDir(device_state).save(dataclasses.replace(stored, run_id="f" * 32))
        other = heterofl(*device_command(url, mnist_dir, device_state)[3:])
    finally:
        stop(process)
    assert other.returncode == 2
    assert other.stderr.splitlines() == [
        f"error: --state-dir {device_state} holds device {stored.device_id} of run {'f' * 32} "
        f"at {url}; {url} serves run {run_id}",
        f"hint: this device belongs to another coordinator: remove {device_state}/device.json "
        "to register with this one, or give it another --state-dir",
    ]


def test_bad_device_settings_end_in_one_line(tmp_path, mnist_dir):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    out = heterofl(
        "device", "--coordinator", "http://127.0.0.1:9", "--data-dir", str(mnist_dir),
        "--state-dir", str(foreign),
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"error: --state-dir {foreign} is not a device's state folder: it holds notes.txt",
        "hint: give this device a folder of its own (empty, or one it wrote before)",
    ]
    out = heterofl(
        "device", "--coordinator", "http://127.0.0.1:9", "--data-dir", str(mnist_dir),
        "--max-memory-mb", "0",
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: --max-memory-mb must be positive, got 0"]


def test_a_refusal_for_memory_is_the_users_to_fix_in_one_line(monkeypatch, tmp_path, mnist_dir):
    from device_sim.device import Device
    from device_sim.worker import WorkerConfig, run_worker

    def refuse(self):
        raise ProtocolError(
            "HTTP 400: a memory limit of 120 MB fits no level of mode a-e",
            "raise the device's --max-memory-mb to at least 146, or run smaller levels",
            code="insufficient_memory",
        )

    monkeypatch.setattr(Device, "register", refuse)
    config = WorkerConfig("http://127.0.0.1:9", mnist_dir, tmp_path / "cache", clients=100)
    with pytest.raises(ConfigError) as refused:
        run_worker(config, log=lambda _m: None)
    assert refused.value.message == (
        "the coordinator refused this device: a memory limit of 120 MB fits no level of mode a-e"
    )
    assert refused.value.hint.startswith("raise the device's --max-memory-mb to at least 146")


@pytest.mark.slow
def test_a_memory_limit_below_the_smallest_level_ends_in_one_line(
    tmp_path, mnist_dir, artifact_cache, monkeypatch
):
    """The coordinator's refusal, end to end: 10 MB over the process fits no level's training."""
    import device_sim.device
    from device_sim.worker import WorkerConfig, run_worker

    process, url = serve(tmp_path, artifact_cache)
    monkeypatch.setattr(device_sim.device, "resident_mb", lambda: 100.0)  # the process's base
    config = WorkerConfig(url, mnist_dir, tmp_path / "cache", train_examples=200, max_memory_mb=110)
    try:
        with pytest.raises(ConfigError) as refused:
            run_worker(config, log=lambda _m: None)
        devices = requests.get(f"{url}/v1/devices", timeout=10).json()["devices"]
    finally:
        stop(process)
    assert refused.value.message == (
        "the coordinator refused this device: a memory limit of 110 MB (100 MB of it held by "
        "the device's process) fits no level of mode e1: the smallest, e, needs about 20 MB "
        "more than the process"
    )
    assert refused.value.hint == (
        "raise the device's --max-memory-mb to at least 121, or run smaller levels"
    )
    assert devices == []


def test_a_memory_limit_below_the_process_itself_ends_in_one_line(tmp_path, mnist_dir):
    process, url = start_coordinator(
        ["--state-dir", str(tmp_path / "state"), "--mode", "e", "--no-artifacts"],
        tmp_path / "coordinator.log",
    )
    try:
        out = heterofl(
            "device", "--coordinator", url, "--data-dir", str(mnist_dir),
            "--train-examples", "200", "--max-memory-mb", "20",
        )  # fmt: skip
    finally:
        stop(process)
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr
    assert re.fullmatch(
        r"error: this device's process already holds \d+ MB \(Python, its runtime and 200 "
        r"examples\), over --max-memory-mb 20",
        lines[0],
    )
    assert lines[1] == (
        "hint: raise --max-memory-mb, or hold fewer examples (--train-examples, --clients)"
    )
