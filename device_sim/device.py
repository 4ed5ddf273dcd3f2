"""One device: profile itself, register, then do what the coordinator asks until done.

Runs unchanged in a simulated fleet and on a Raspberry Pi: it needs numpy,
onnxruntime, safetensors and requests, never torch.

With a memory limit (``memory_limit_mb``, the command's ``--max-memory-mb``)
the device measures what its process holds once its runtime has trained the
reference level and tells the coordinator both figures at registration; the
coordinator answers with the largest level whose training fits (or refuses
the device, ``insufficient_memory``). The device then holds one level's
programs at a time, computes sBN statistics ``LIMITED_STATISTICS_BATCH``
examples at a time instead of 500, and refuses a training task above that
level (a coordinator that ignored the limit) instead of running out of
memory. Every training task's peak resident memory is logged and sent with
the upload's metrics (``peak_memory_mb``).

Transport encodings (``heterofl_edge.encoding``) are handled here, in numpy,
for every runtime (the ExecuTorch runtime runs inside this device too): the
device declares the encodings it can decode and encode at registration, decodes
whatever weights it is sent, and uploads what the task's ``upload_encoding``
says: the trained weights (fp32) or the update, with its error-feedback
residual kept per level.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from device_sim.memory import PeakMemory, resident_mb
from device_sim.protocol import CoordinatorClient, ProtocolError
from device_sim.runtimes import get_runtime
from device_sim.state import DeviceIdentity
from heterofl_edge.assignment import parse_mode
from heterofl_edge.batching import SplitMix64
from heterofl_edge.device_runtime import LevelRuntime, TrainingRequest, merge_batch_statistics
from heterofl_edge.dp_noise import add_distributed_noise
from heterofl_edge.encoding import Encoding, UpdateEncoder
from heterofl_edge.errors import ConfigError
from heterofl_edge.levels import rate_label
from heterofl_edge.protocol import (
    DeviceProfile,
    DistributedNoise,
    DoneTask,
    ErrorCode,
    Health,
    Registered,
    Runtime,
    SecAggAnswer,
    SecAggTask,
    SecureMasking,
    StatisticsTask,
    TrainTask,
    UnknownTask,
    UploadMetadata,
    WaitTask,
)
from heterofl_edge.secagg import (
    MODULUS_BITS,
    Advertisement,
    FixedPoint,
    LayoutPlan,
    Quantizer,
    SecAggClient,
    SecAggRefusal,
    SharedInt8,
    VectorLayout,
    b64,
    statistics_layout,
    statistics_vector,
    training_vector,
    unb64,
)

__all__ = ["LIMITED_STATISTICS_BATCH", "Capabilities", "Device", "chunked_statistics"]

PROFILE_STEPS = 5
# Examples per statistics batch under a memory limit (the paper's training batch), instead of
# the protocol's 500: the global level's activations for 500 examples can outgrow training.
LIMITED_STATISTICS_BATCH = 10
# Error codes that mean "this task is over": log it and ask for the next one.
_TASK_GONE = frozenset(
    {
        ErrorCode.round_closed,
        ErrorCode.stale_update,  # buffered: the update's version is too far behind
        ErrorCode.duplicate_upload,
        ErrorCode.not_assigned,
        ErrorCode.unknown_round,
    }
)


@dataclass(frozen=True)
class Capabilities:
    """What a simulated device can do (a real device uses the defaults)."""

    cpu_slowdown: float = 1.0  # compute takes this many times as long as on this machine
    bandwidth_mbps: float | None = None  # None: no cap
    memory_mb: float = 4096.0
    dropout: float = 0.0  # probability of vanishing in the middle of a round's training
    runtime: str = "onnx"  # a name in device_sim.runtimes: onnx, or executorch (extra)
    # Transport encodings it declares (heterofl_edge.encoding); () declares none: fp32 only.
    encodings: tuple[str, ...] = tuple(e.value for e in Encoding)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capabilities:
        known = {k: data[k] for k in asdict(cls()) if k in data}
        if "encodings" in known:
            known["encodings"] = tuple(Encoding(e).value for e in known["encodings"])
        return cls(**known)


class Device:
    def __init__(
        self,
        client: CoordinatorClient,
        images: np.ndarray,
        labels: np.ndarray,
        capabilities: Capabilities = Capabilities(),
        seed: int = 0,
        log: Callable[[str], None] = lambda _m: None,
        sleep: Callable[[float], None] = time.sleep,
        memory_limit_mb: float | None = None,
    ) -> None:
        self.client = client
        self.images = images
        self.labels = labels
        self.present = sorted(int(v) for v in np.unique(labels))
        self.capabilities = capabilities
        self.rng = np.random.default_rng(seed)
        self.log = log
        self._sleep = sleep
        self._runtime = get_runtime(capabilities.runtime)  # a ConfigError if unknown
        self._levels: dict[str, LevelRuntime] = {}
        self.encoder = UpdateEncoder()  # lossy uploads and their error-feedback residual
        self._notes: set[str] = set()  # encoding fallbacks the coordinator told, logged once
        self.heartbeat_seconds = 5.0
        self.poll_seconds = 2.0  # how long to wait when a task says neither what nor how long
        self.memory_limit_mb = memory_limit_mb
        self.base_memory_mb: float | None = None  # measured once the reference level trained
        self.max_rate: float | None = None  # the largest rate its memory trains (coordinator)
        self.health: Health | None = None  # the coordinator's, as read when profiling
        self._peak = PeakMemory()
        self._refused: set[int] = set()  # rounds whose task was over the memory limit
        self._secagg: dict[str, SecAggClient] = {}  # secure aggregation instances, by context
        # Instances this device cannot go on in (a refused stage, keys lost to a restart): their
        # tasks, sent again until the stage closes, are waited out, never answered or trained.
        self._sitting_out: dict[str, None] = {}  # (in order, for forgetting the oldest)

    def _level(self, manifest_url: str) -> LevelRuntime:
        """The level's programs in this device's runtime (one level at a time under a limit)."""
        if manifest_url not in self._levels:
            if self.memory_limit_mb is not None:
                self._levels.clear()  # free the previous level's sessions first
            folder = self.client.artifact(manifest_url, self.capabilities.runtime)
            self._levels[manifest_url] = self._runtime(folder)
        return self._levels[manifest_url]

    def _slow_down(self, seconds: float) -> None:
        extra = (self.capabilities.cpu_slowdown - 1.0) * seconds
        if extra > 0:
            self._sleep(extra)

    def profile(self) -> DeviceProfile:
        """Time a few training steps of the smallest level in play (the reference artifact).

        Under a memory limit, also measure what the process holds once its
        runtime has trained (libraries loaded, the reference level's session
        made): the base the coordinator adds a level's training memory to.
        ``ConfigError`` if that alone reaches the limit.
        """
        health = self.client.health()
        self.health = health
        if self.memory_limit_mb is not None:
            self._check_base_memory(self.memory_limit_mb)  # before loading anything more
        reference = min(parse_mode(health.mode).rates)
        level = self._level(f"/v1/artifacts/{health.model}/{rate_label(reference)}/manifest.json")
        self._check_data(level.manifest, health.model)
        weights = {
            p["name"]: np.zeros(p["shape"], np.float32) for p in level.manifest["parameters"]
        }
        batch = getattr(level, "batch", min(10, len(self.labels)))  # ExecuTorch: the program's
        x, y = self.images[:batch], self.labels[:batch]

        def steps(count: int) -> TrainingRequest:
            return TrainingRequest(weights, x, y, self.present, 0.0, count, batch, 0)

        level.train(steps(1))  # warm-up: sessions, caches
        start = time.perf_counter()
        level.train(steps(PROFILE_STEPS))
        elapsed = time.perf_counter() - start
        step_ms = 1000 * elapsed / PROFILE_STEPS * self.capabilities.cpu_slowdown
        if self.memory_limit_mb is not None:
            self.base_memory_mb = self._check_base_memory(self.memory_limit_mb)
        limit = self.memory_limit_mb
        return DeviceProfile(
            step_ms=step_ms,
            reference_rate=reference,
            memory_mb=limit if limit is not None else self.capabilities.memory_mb,
            base_memory_mb=self.base_memory_mb if limit is not None else None,
            bandwidth_mbps=self.capabilities.bandwidth_mbps or 1000.0,
            runtimes=[Runtime(self.capabilities.runtime)],
            num_examples=len(self.labels),
            secure_aggregation=True,  # it masks its uploads when a run asks (secagg)
            encodings=[Encoding(e) for e in self.capabilities.encodings] or None,
        )

    def _check_data(self, manifest: dict[str, Any], model: str) -> None:
        """``ConfigError`` unless this device's examples fit the model (shape, labels)."""
        expected = tuple(manifest["input"]["shape"][1:])
        found = tuple(self.images.shape[1:])
        if found != expected:
            raise ConfigError(
                f"this device's examples have shape {found}, the coordinator's model {model} "
                f"takes {expected}",
                "read the data as the model needs it (an image folder: --image-size and "
                "--channels), or export it with 'heterofl-edge data export --model'",
            )
        if self.labels.ndim > 1 and "masked_language_model" not in manifest:
            raise ConfigError(
                f"this device holds token rows, but the coordinator's {model} artifacts do not "
                "say how to mask them (exported before devices trained language models)",
                "restart the coordinator with a fresh --state-dir so that it exports them again",
            )
        classes = int(manifest["num_classes"])
        if self.present and self.present[-1] >= classes:
            raise ConfigError(
                f"this device holds label {self.present[-1]}, the model has {classes} classes",
                "use the coordinator's data set",
            )

    def _check_base_memory(self, limit_mb: float) -> float:
        """What the process holds now (code, runtime, examples), if below ``limit_mb``."""
        held = resident_mb()
        if held is None:
            raise ConfigError(
                "--max-memory-mb needs /proc/self/statm (Linux) to measure this device's memory",
                "leave --max-memory-mb out on this system",
            )
        if held >= limit_mb:
            raise ConfigError(
                f"this device's process already holds {held:.0f} MB (Python, its runtime and "
                f"{len(self.labels)} examples), over --max-memory-mb {limit_mb:g}",
                "raise --max-memory-mb, or hold fewer examples (--train-examples, --clients)",
            )
        return held

    def register(self) -> Registered:
        """Profile, register, and take what the registration says (intervals, memory level)."""
        reply = self.client.register(self.profile())
        self._take(reply.poll_seconds, reply.heartbeat_seconds, reply.max_rate)
        self.log(f"registered as {reply.device_id} (level {reply.level or 'per round'})")
        if self.memory_limit_mb is not None:
            self.log(
                f"memory: --max-memory-mb {self.memory_limit_mb:g}, {self.base_memory_mb:.0f} MB "
                f"held before training; levels up to {reply.max_level or 'any'} fit"
            )
        return reply

    def resume(self, identity: DeviceIdentity) -> None:
        """Carry on as the registered device ``identity`` (its token, its intervals)."""
        self.client.token = identity.token
        self._take(identity.poll_seconds, identity.heartbeat_seconds, identity.max_rate)
        self.log(f"resumed as {identity.device_id} (registered {_when(identity.registered_at)})")

    def _take(self, poll: float, heartbeat: float, max_rate: float | None) -> None:
        self.poll_seconds = poll
        self.heartbeat_seconds = heartbeat
        self.max_rate = max_rate

    @contextlib.contextmanager
    def _heartbeats(self) -> Iterator[None]:
        """While a task runs, tell the coordinator this device is alive (a thread)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.heartbeat_seconds):
                self.client.heartbeat()

        thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1)

    def run(self, idle_limit_s: float = 600.0) -> None:
        """Work until the coordinator says done (or stays silent past ``idle_limit_s``).

        An action this device does not know (a newer coordinator's) is waited out
        like ``wait``: no hot loop against the server.
        """
        idle = 0.0
        unknown: set[str] = set()
        while True:
            task = self.client.task(self.poll_seconds)
            if isinstance(task, DoneTask):
                self.log("coordinator says done")
                return
            if isinstance(task, UnknownTask) and task.asked not in unknown:
                unknown.add(task.asked)
                self.log(f"the coordinator asks for {task.asked!r}, which this device cannot do")
            if isinstance(task, WaitTask):
                if idle > idle_limit_s:
                    self.log("no task for too long; stopping")
                    return
                self._sleep(task.retry_after)
                idle += task.retry_after
                continue
            idle = 0.0
            if self._sits_out(task):
                self._sleep(self.poll_seconds)  # the same task comes back until its stage closes
                continue
            if isinstance(task, SecAggTask):
                self.secagg(task)
                continue
            if isinstance(task, TrainTask) and self._over_limit(task):
                self._sleep(self.poll_seconds)  # the same task comes back until its round closes
                continue
            self.heartbeat_seconds = task.heartbeat_seconds
            with self._heartbeats():
                if isinstance(task, TrainTask):
                    self.train(task)
                else:
                    self.statistics(task)

    def _over_limit(self, task: TrainTask) -> bool:
        """Whether ``task``'s level is above the largest its memory trains (logged once a round)."""
        if self.max_rate is None or task.rate <= self.max_rate * (1 + 1e-9):
            return False
        if task.round not in self._refused:
            self._refused.add(task.round)
            self.log(
                f"round {task.round}: not training level {task.level}: its training does not fit "
                f"--max-memory-mb {self.memory_limit_mb:g} (the coordinator said rate "
                f"{self.max_rate:g} at most)"
            )
        return True

    def train(self, task: TrainTask) -> None:
        self._peak.mark()
        level = self._level(task.artifact.manifest_url)
        sent, received = self.client.bytes_sent, self.client.bytes_received
        self._note(task)
        download = self._skip(task, lambda: self.client.tensors(task.weights_url))
        if download is None:
            return
        weights = download.arrays
        if self.capabilities.dropout and self.rng.random() < self.capabilities.dropout:
            self.log(f"round {task.round}: dropping out mid-round")
            os._exit(3)  # vanish like an unplugged device: no goodbye to the coordinator
        hyper = task.hyperparameters
        start = time.perf_counter()
        result = level.train(
            TrainingRequest(
                {name: array.copy() for name, array in weights.items()},
                self.images,
                self.labels,
                self.present,
                task.lr,
                hyper.epochs,
                hyper.batch_size,
                task.seed,
            )
        )
        self._slow_down(time.perf_counter() - start)
        trained = result.weights
        if task.distributed_noise is not None:  # this device's share of the DP noise
            trained = self._noised(weights, trained, task.distributed_noise)
        peak = self._peak.peak_mb()
        if task.secure is not None:  # the masked update only: no labels, metrics or counts
            masked = self._masked_update(task, task.secure, weights, trained)
            if masked is not None and self._deliver(task, {"masked": masked}, None):
                self.log(f"round {task.round}: sent the masked update of level {task.level}")
            return
        metadata = (
            UploadMetadata()  # a private run: the update only, nothing about the data
            if task.private
            else UploadMetadata(
                num_samples=result.num_examples,
                labels=self.present,
                metrics={
                    "loss": result.loss,
                    "accuracy": result.accuracy,
                    "steps": result.steps,
                    "peak_memory_mb": round(peak, 1),
                },
            )
        )
        body = self.encoder.encode(
            trained,
            weights,
            task.upload_encoding,
            task.rounding_seed,
            task.level,
            task.error_feedback,
            metadata.to_metadata(),
        )
        if self._skip(task, lambda: self.client.send(task.upload_url, body)) is None:
            self.encoder.forget()  # the update was lost: so is what its residual refers to
            return
        down, up = self.client.bytes_received - received, self.client.bytes_sent - sent
        self.log(
            f"round {task.round}: trained level {task.level}, loss {result.loss:.4f}, "
            f"bytes down {down} ({task.download_encoding.value}) "
            f"up {up} ({task.upload_encoding.value}), peak memory {peak:.0f} MB"
        )
        self._check_peak(task, peak)

    def _check_peak(self, task: TrainTask | StatisticsTask, peak: float) -> None:
        """Say so when a task's peak went over the limit (the coordinator's estimate was low)."""
        if self.memory_limit_mb is not None and peak > self.memory_limit_mb:
            self.log(
                f"round {task.round}: {task.action} at level {task.level} peaked at {peak:.0f} MB, "
                f"over --max-memory-mb {self.memory_limit_mb:g}"
            )

    def _note(self, task: TrainTask | StatisticsTask) -> None:
        """Log, once, that the coordinator replaced an encoding this device did not declare."""
        if task.encoding_note and task.encoding_note not in self._notes:
            self._notes.add(task.encoding_note)
            self.log(f"round {task.round}: {task.encoding_note}")

    def statistics(self, task: StatisticsTask) -> None:
        """The global model's sBN statistics over every example, uploaded.

        Under a memory limit the examples go through the program
        ``LIMITED_STATISTICS_BATCH`` at a time (a multiple of an ExecuTorch
        program's fixed batch) instead of 500.
        """
        self._peak.mark()
        level = self._level(task.artifact.manifest_url)
        self._note(task)
        download = self._skip(task, lambda: self.client.tensors(task.weights_url))
        if download is None:
            return
        weights = download.arrays
        if self.memory_limit_mb is None:
            stats = level.statistics(weights, self.images)
        else:
            fixed = int(getattr(level, "batch", 1))  # ExecuTorch: the program's batch
            step = fixed * max(1, -(-LIMITED_STATISTICS_BATCH // fixed))
            stats = chunked_statistics(level, weights, self.images, step)
        if task.private:  # each report weighs as one client: the count is not released
            stats = {k: np.ones_like(v) if k.endswith(".count") else v for k, v in stats.items()}
        if task.secure is not None:
            layers = [(name, int(channels)) for name, channels in task.secure.layers]
            layout = statistics_layout(layers)
            vector = statistics_vector(stats, layers, float(task.secure.statistics_scale or 0))
            masked = self._mask(task, task.secure, vector, layout, lambda rate: layout)
            if masked is not None and self._deliver(task, {"masked": masked}, None):
                self.log(f"round {task.round}: sent masked sBN statistics")
            return
        if self._deliver(task, stats, None):
            self.log(f"round {task.round}: sent sBN statistics")
        self._check_peak(task, self._peak.peak_mb())

    # -- secure aggregation -------------------------------------------------------------
    def _sits_out(self, task: object) -> bool:
        """Whether ``task`` belongs to a secure aggregation instance this device cannot go on in.

        A secure training or statistics task whose instance it holds no keys for (a
        restart lost them) joins those instances here, logged once: training it would
        give an upload nobody can unmask.
        """
        if isinstance(task, SecAggTask):
            return task.context in self._sitting_out
        secure = getattr(task, "secure", None)
        if not isinstance(secure, SecureMasking):
            return False
        if secure.context not in self._secagg and secure.context not in self._sitting_out:
            self.log(
                f"round {getattr(task, 'round', '?')}: no keys for this aggregation "
                "(restarted?); sitting it out"
            )
            self._sitting_out[secure.context] = None
        return secure.context in self._sitting_out

    def secagg(self, task: SecAggTask) -> None:
        """Answer a secure aggregation stage (keys, encrypted shares, unmasking shares).

        A stage it cannot answer (refused by the protocol, or no keys) puts the
        instance in ``_sitting_out``: its later tasks are waited out.
        """
        try:
            answer = self._secagg_answer(task)
        except SecAggRefusal as refusal:
            self.log(f"round {task.round}: secure aggregation {task.stage}: {refusal.message}")
            self._sitting_out[task.context] = None
            return
        if answer is None:
            self._sitting_out[task.context] = None
            return
        body = answer.model_dump(mode="json", exclude_none=True)
        self._skip(task, lambda: self.client.answer(task.answer_url, body))

    def _secagg_answer(self, task: SecAggTask) -> SecAggAnswer | None:
        if task.stage == "advertise":
            client = SecAggClient(task.context, task.index)
            while len(self._secagg) >= 4:  # the instances of the last two rounds at most
                self._secagg.pop(next(iter(self._secagg)))
            while len(self._sitting_out) >= 16:  # the oldest are long closed
                self._sitting_out.pop(next(iter(self._sitting_out)))
            self._secagg[task.context] = client
            keys = client.advertise()
            return SecAggAnswer(
                context=task.context,
                stage="advertise",
                c_public=b64(keys.c_public),
                s_public=b64(keys.s_public),
            )
        held = self._secagg.get(task.context)
        if held is None:
            self.log(f"round {task.round}: no keys for this aggregation (restarted?); skipping")
            return None
        if task.stage == "share":
            neighbours = {
                p.index: Advertisement(unb64(p.c_public), unb64(p.s_public))
                for p in task.neighbours
            }
            shares = held.share_keys(neighbours, int(task.threshold or 0))
            return SecAggAnswer(
                context=task.context,
                stage="share",
                shares={str(v): b64(blob) for v, blob in shares.items()},
            )
        values = held.unmask(task.dropped, task.survivors)
        return SecAggAnswer(
            context=task.context, stage="unmask", unmask={str(v): str(x) for v, x in values.items()}
        )

    def _masked_update(
        self,
        task: TrainTask,
        secure: SecureMasking,
        received: dict[str, np.ndarray],
        trained: dict[str, np.ndarray],
    ) -> np.ndarray | None:
        """The update (trained minus received) in fixed point or int8, masked (secagg)."""
        plan = LayoutPlan.from_json(secure.plan or {})
        quantizer: Quantizer
        if secure.encoding == "int8":
            quantizer = SharedInt8(float(secure.clip or 0), secure.modulus_bits)
        else:
            quantizer = FixedPoint(float(secure.scale or 0), float(secure.clip or 0))
        update = {
            n: np.asarray(trained[n], np.float64) - np.asarray(received[n], np.float64)
            for n in plan.names
        }
        rng = SplitMix64(task.rounding_seed)
        vector = training_vector(update, plan, task.rate, quantizer, self.present, rng)
        return self._mask(
            task, secure, vector, plan.layout(task.rate), plan.layout, quantizer.modulus_bits
        )

    def _mask(
        self,
        task: TrainTask | StatisticsTask,
        secure: SecureMasking,
        vector: np.ndarray,
        layout: VectorLayout,
        layout_of: Callable[[float], VectorLayout],
        modulus_bits: int = MODULUS_BITS,
    ) -> np.ndarray | None:
        client = self._secagg.get(secure.context)
        if client is None:
            self.log(f"round {task.round}: no keys for this aggregation (restarted?); skipping")
            return None
        peers = {int(v): layout_of(rate) for v, rate in secure.peers.items()}
        ciphertexts = {int(v): unb64(blob) for v, blob in secure.ciphertexts.items()}
        try:
            return client.mask(vector, layout, peers, ciphertexts, modulus_bits)
        except SecAggRefusal as refusal:
            self.log(f"round {task.round}: cannot mask: {refusal.message}")
            self._sitting_out[secure.context] = None
            return None

    def _noised(
        self,
        received: dict[str, np.ndarray],
        trained: dict[str, np.ndarray],
        noise: DistributedNoise,
    ) -> dict[str, np.ndarray]:
        """The received weights plus the clipped update with this device's noise share."""
        update = {n: trained[n].astype(np.float64) - received[n] for n in trained}
        noised = add_distributed_noise(
            update,
            noise.clip,
            noise.noise_multiplier,
            noise.reporting_fraction,
            noise.sizes,
            noise.blocks,
            np.random.default_rng(),  # the operating system's entropy: noise nobody predicts
        )
        return {n: (received[n] + noised[n]).astype(np.float32) for n in trained}

    def _deliver(
        self,
        task: TrainTask | StatisticsTask,
        tensors: dict[str, np.ndarray],
        metadata: UploadMetadata | None,
    ) -> bool:
        """Upload a task's result; a task that closed meanwhile is logged, not fatal."""
        return (
            self._skip(task, lambda: self.client.upload(task.upload_url, tensors, metadata))
            is not None
        )

    def _skip(self, task: TrainTask | StatisticsTask | SecAggTask, call: Callable[[], Any]) -> Any:
        """``call()``, or None (logged) when the task is no longer open; decides on codes."""
        try:
            return call()
        except ProtocolError as exc:
            if exc.code not in _TASK_GONE:
                raise
            self.log(f"round {task.round}: too late, the coordinator moved on ({exc.message})")
            return None


def chunked_statistics(
    level: LevelRuntime, weights: dict[str, np.ndarray], x: np.ndarray, size: int
) -> dict[str, np.ndarray]:
    """``level.statistics`` over ``x`` taken ``size`` examples at a time, merged exactly.

    Each chunk's LAYER.count / .mean / .var is one report for
    ``merge_batch_statistics`` (Chan et al.'s pairwise rule), so the result is
    the whole pass's up to float rounding, in the memory of one chunk.
    """
    layers: list[str] = list(level.manifest["bn_layers"])

    def reports() -> Iterator[tuple[int, list[np.ndarray]]]:
        for start in range(0, len(x), size):
            part = level.statistics(weights, x[start : start + size])
            count = round(float(np.asarray(part[f"{layers[0]}.count"]).reshape(-1)[0]))
            if count:
                yield count, [part[f"{name}.{m}"] for name in layers for m in ("mean", "var")]

    return merge_batch_statistics(layers, reports()) if layers else {}


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
