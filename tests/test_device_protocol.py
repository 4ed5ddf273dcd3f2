"""The device's HTTP client: backoff while the coordinator is away, refused tokens."""

import random

import pytest

from coordinator.process import free_port, start_coordinator, stop
from device_sim.device import Device
from device_sim.protocol import (
    CoordinatorClient,
    CoordinatorUnreachable,
    ProtocolError,
    TokenRefused,
)
from device_sim.worker import WorkerConfig, run_worker
from heterofl_edge.protocol import (
    Accepted,
    ArtifactRef,
    Hyperparameters,
    Registered,
    TrainTask,
    UploadMetadata,
)

TASK = TrainTask(
    round=2, level="e", rate=0.0625, seed=1, lr=0.01,
    hyperparameters=Hyperparameters(
        epochs=1, batch_size=10, momentum=0.9, weight_decay=5e-4, clip_grad_norm=1.0
    ),
    artifact=ArtifactRef(
        model="conv", level="e", manifest_url="/v1/artifacts/conv/e/manifest.json", formats=["onnx"]
    ),
    weights_url="/v1/rounds/2/weights", upload_url="/v1/rounds/2/update", deadline=0.0,
    heartbeat_seconds=5.0,
)  # fmt: skip


class Highest(random.Random):
    """A random source whose every draw is the top of its range: the back-off's ceilings."""

    def uniform(self, a, b):
        return b


def test_unreachable_coordinator_is_retried_with_backoff_then_reported(tmp_path):
    waits, lines = [], []
    client = CoordinatorClient(
        f"http://127.0.0.1:{free_port()}",
        tmp_path,
        retry_seconds=30,
        sleep=waits.append,
        rng=Highest(),
        log=lines.append,
    )
    with pytest.raises(CoordinatorUnreachable, match=r"unreachable for 3[0-9] s"):
        client.health()
    # the ceilings of the jittered back-off: exponential, capped at 10 s
    assert waits[:7] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0] and max(waits) == 10.0
    assert lines == [  # one line for the whole streak, however many tries
        "coordinator unavailable (connection refused); retrying with back-off (at most 10 s apart)"
    ]


@pytest.fixture
def coordinator(tmp_path):
    process, url = start_coordinator(
        [
            "--state-dir",
            str(tmp_path / "state"),
            "--mode",
            "a-e",
            "--policy",
            "dynamic",
            "--no-artifacts",
        ],
        tmp_path / "coordinator.log",
    )
    yield url
    stop(process)


def test_a_refused_token_raises_and_the_worker_exits_cleanly(
    coordinator, tmp_path, mnist_dir, capsys, monkeypatch
):
    client = CoordinatorClient(coordinator, tmp_path)
    client.token = "not-a-token"
    with pytest.raises(TokenRefused, match="unknown token"):
        client.task()

    def refuse(self, profile):
        self.token = "forged"
        return Registered(
            device_id="x", token="forged", level=None, rate=None, policy="dynamic",
            poll_seconds=2.0, heartbeat_seconds=5.0,
        )  # fmt: skip

    monkeypatch.setattr(CoordinatorClient, "register", refuse)
    monkeypatch.setattr(Device, "profile", lambda self: None)
    code = run_worker(
        WorkerConfig(coordinator, mnist_dir, tmp_path / "cache", shard=0, clients=100)
    )
    out = capsys.readouterr().out
    assert code == 4
    assert "token refused (unknown token); exiting" in out and "Traceback" not in out


def test_a_late_upload_is_logged_and_the_device_carries_on():
    import numpy as np

    class LateClient:
        def upload(self, path, tensors, metadata):
            raise ProtocolError(
                "HTTP 409: round 2 closed before your result arrived", code="round_closed"
            )

    lines = []
    device = Device(
        LateClient(), np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]), log=lines.append
    )
    assert device._deliver(TASK, {}, None) is False
    assert lines == [
        "round 2: too late, the coordinator moved on "
        "(HTTP 409: round 2 closed before your result arrived)"
    ]

    class BrokenClient:
        def upload(self, path, tensors, metadata):
            raise ProtocolError(
                "HTTP 422: blocks.0.conv.weight has shape (1,), expected (4, 1, 3, 3)"
            )

    with pytest.raises(ProtocolError, match="422"):
        Device(BrokenClient(), np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]))._deliver(
            TASK, {}, None
        )


def test_a_server_fault_is_retried_with_backoff_and_the_device_goes_on(tmp_path):
    """A 5xx is the coordinator's fault: the device waits and sends the same request again."""
    import json

    import requests

    waits = []
    client = CoordinatorClient("http://127.0.0.1:9", tmp_path, sleep=waits.append, rng=Highest())
    replies = []
    for status, body in (
        (503, {"code": "storage_error", "message": "disk full", "hint": ""}),
        (500, {"code": "internal_error", "message": "bug", "hint": ""}),
        (200, {"accepted": True, "round": 1}),
    ):
        reply = requests.Response()
        reply.status_code = status
        reply._content = json.dumps(body).encode()
        replies.append(reply)
    sent = []

    def request(method, url, **kwargs):
        sent.append((method, url, kwargs["data"]))
        return replies.pop(0)

    client._session.request = request
    accepted = client.upload("/v1/rounds/1/update", {}, UploadMetadata(num_samples=1))
    assert accepted == Accepted(accepted=True, round=1)
    assert len(sent) == 3 and len({s[2] for s in sent}) == 1  # the same body each time
    assert waits == [0.25, 0.5]


def test_data_that_does_not_fit_the_model_is_refused_before_training():
    import numpy as np

    from heterofl_edge.errors import ConfigError

    manifest = {"input": {"shape": ["batch", 1, 28, 28]}, "num_classes": 10}
    fits = Device(None, np.zeros((2, 1, 28, 28), np.float32), np.array([0, 9]))
    fits._check_data(manifest, "conv")  # no error
    rgb = Device(None, np.zeros((2, 3, 32, 32), np.float32), np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"shape \(3, 32, 32\).*takes \(1, 28, 28\)"):
        rgb._check_data(manifest, "conv")
    too_many = Device(None, np.zeros((2, 1, 28, 28), np.float32), np.array([0, 12]))
    with pytest.raises(ConfigError, match="label 12, the model has 10 classes"):
        too_many._check_data(manifest, "conv")
    rows = np.arange(128).reshape(2, 64) % 50
    text = {"input": {"shape": ["batch", 64]}, "num_classes": 50}
    with pytest.raises(ConfigError, match="do not say how to mask") as info:
        Device(None, rows, rows)._check_data(text, "transformer")  # an older export
    assert "fresh --state-dir" in info.value.hint
    masked = {"mask_token": 50, "mask_rate": 0.15, "scored_positions": "masked"}
    Device(None, rows, rows)._check_data(text | {"masked_language_model": masked}, "transformer")


def test_an_action_the_device_does_not_know_is_waited_out_not_polled_hot():
    import json

    import numpy as np
    import requests

    class FutureCoordinator(CoordinatorClient):
        def __init__(self):
            self.tasks = [{"action": "reticulate"}, {"action": "reticulate", "retry_after": 3}]
            self.tasks += [{"action": "done", "rounds": 1}]

        def _request(self, method, path, **kwargs):
            reply = requests.Response()
            reply.status_code, reply._content = 200, json.dumps(self.tasks.pop(0)).encode()
            return reply

    waits, lines = [], []
    device = Device(
        FutureCoordinator(),
        np.zeros((2, 1, 28, 28), np.float32),
        np.array([0, 1]),
        log=lines.append,
        sleep=waits.append,
    )
    device.run()
    assert waits == [2.0, 3.0]  # the poll interval when the task says none, else its own
    assert lines == [
        "the coordinator asks for 'reticulate', which this device cannot do",
        "coordinator says done",
    ]


def test_a_secure_instance_the_device_cannot_go_on_in_is_waited_out_not_answered_or_trained():
    """A share stage for an instance whose keys this device does not hold (it restarted after
    advertising), sent again until the stage closes, and that instance's training task: the
    device answers nothing, trains nothing and waits the poll interval each time."""
    import json

    import numpy as np
    import requests

    share = {
        "action": "secagg", "round": 3, "phase": "training", "stage": "share",
        "context": "run-1/3/training", "index": 2, "answer_url": "/v1/rounds/3/secagg",
        "deadline": 0.0, "heartbeat_seconds": 5.0, "threshold": 2,
    }  # fmt: skip
    train = {
        "action": "train", "round": 3, "level": "a", "rate": 1.0,
        "artifact": {
            "model": "conv", "level": "a", "manifest_url": "/v1/artifacts/a/manifest.json",
            "formats": ["onnx"],
        },
        "weights_url": "/v1/rounds/3/weights", "upload_url": "/v1/rounds/3/upload",
        "deadline": 0.0, "heartbeat_seconds": 5.0, "seed": 1, "lr": 0.01,
        "hyperparameters": {
            "epochs": 1, "batch_size": 10, "momentum": 0.9, "weight_decay": 0,
            "clip_grad_norm": None,
        },
        "secure": {"context": "run-1/3/training", "index": 2, "peers": {}, "ciphertexts": {}},
    }  # fmt: skip

    class RestartedCoordinator(CoordinatorClient):
        def __init__(self):
            self.tasks = [share, share, train, {"action": "done", "rounds": 3}]
            self.answered: list[str] = []

        def _request(self, method, path, **kwargs):
            reply = requests.Response()
            reply.status_code, reply._content = 200, json.dumps(self.tasks.pop(0)).encode()
            return reply

        def answer(self, url, body):
            self.answered.append(url)

    waits, lines = [], []
    coordinator = RestartedCoordinator()
    device = Device(
        coordinator,
        np.zeros((2, 1, 28, 28), np.float32),
        np.array([0, 1]),
        log=lines.append,
        sleep=waits.append,
    )
    device.train = lambda task: pytest.fail("a task of an instance it sat out was trained")
    device.run()
    assert coordinator.answered == []
    assert waits == [2.0, 2.0]  # the second share and the training task: the poll interval
    assert lines == [
        "round 3: no keys for this aggregation (restarted?); skipping",
        "coordinator says done",
    ]


def test_a_task_whose_batch_the_executorch_program_cannot_train_is_a_clear_error(tmp_path):
    """ExecuTorch programs train the batch they were exported with: another batch in a task is
    the coordinator's misconfiguration, said in one line with what to do (no traceback)."""
    import json

    import numpy as np

    pytest.importorskip("executorch")
    from exporter.executorch_runtime import ExecuTorchLevel
    from heterofl_edge.device_runtime import TrainingRequest
    from heterofl_edge.errors import ConfigError

    manifest = {"level": "e", "parameters": [], "num_classes": 10, "batch_size": {"executorch": 10}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    request = TrainingRequest(
        {}, np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), [0], 0.01, 1, 50, 0
    )
    with pytest.raises(ConfigError, match="trains batches of 10, its task asks for 50") as raised:
        ExecuTorchLevel(tmp_path).train(request)
    assert "--batch-size" in (raised.value.hint or "")
