"""The ExecuTorch device runtime: local training on the ``.pte`` artifacts.

A device runtime (``heterofl_edge.device_runtime.LevelRuntime``, as
``device_sim``'s ``OnnxLevel``) registered as the entry point ``executorch`` of
the group ``heterofl_edge.runtimes``; a device loads it only when its runtime
is ``executorch``. It trains with ExecuTorch's training API. ExecuTorch
programs have the fixed batch they were exported with (the manifest's
``batch_size.executorch``): a short last batch of an epoch is skipped and
counted in the result, and the statistics pass uses batches of that size (a
short tail is skipped). It needs the extra
``executorch`` (ExecuTorch's Python bindings need torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.executorch_backend import ExecuTorchTrainer, load_program
from exporter.step import OptimizerSettings
from heterofl_edge.device_runtime import (
    LocalResult,
    TrainingRequest,
    merge_batch_statistics,
    training_batches,
)
from heterofl_edge.errors import ConfigError

__all__ = ["ExecuTorchLevel"]


class ExecuTorchLevel:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
        self.param_names = [p["name"] for p in self.manifest["parameters"]]
        self.num_classes = int(self.manifest["num_classes"])
        self.batch = int(self.manifest["batch_size"]["executorch"])
        self._trainer: Any = None

    def _settings(self) -> OptimizerSettings:
        h = self.manifest["hyperparameters"]
        return OptimizerSettings(h["momentum"], h["weight_decay"], h["clip_grad_norm"])

    def train(self, request: TrainingRequest) -> LocalResult:
        """E local epochs of the training program from ``request.weights``."""
        weights, x, y, labels = request.weights, request.x, request.y, request.labels
        lr, epochs, batch_size, seed = request.lr, request.epochs, request.batch_size, request.seed
        if batch_size != self.batch:
            raise ConfigError(
                f"the coordinator's ExecuTorch program for level {self.manifest.get('level')} "
                f"trains batches of {self.batch}, its task asks for {batch_size}",
                "the coordinator must export its programs at the run's --batch-size: delete "
                "its artifacts folder and start it again, or run this device with --runtime onnx",
            )
        if self._trainer is None:
            self._trainer = ExecuTorchTrainer(
                self.folder / "executorch" / "train.pte", self.param_names, self._settings()
            )
        mask = torch.zeros(self.num_classes)
        mask[labels] = 1.0
        images, targets = torch.from_numpy(x), torch.from_numpy(y)
        if len(targets) < self.batch:
            raise ValueError(
                f"{len(targets)} examples are fewer than the program's batch {self.batch}"
            )
        self._trainer.load_weights(
            {n: torch.from_numpy(weights[n]) for n in self.param_names},
            (images[: self.batch], targets[: self.batch], mask),
        )
        steps, loss_sum, correct, seen = 0, 0.0, 0, 0
        for batch in training_batches(self.manifest, x, y, epochs, batch_size, seed):
            if len(batch.targets) != self.batch:
                continue  # the fixed-batch program cannot take the short tail
            inputs = (torch.from_numpy(batch.inputs), torch.from_numpy(batch.targets), mask)
            loss, right = self._trainer.step(inputs, lr)
            steps, loss_sum, correct, seen = (
                steps + 1,
                loss_sum + loss * batch.scored,
                correct + right,
                seen + batch.scored,
            )
        trained = {n: t.numpy() for n, t in self._trainer.weights().items()}
        return LocalResult(
            trained, len(targets), steps, loss_sum / max(seen, 1), correct / max(seen, 1)
        )

    def statistics(self, weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
        """As ``OnnxLevel.statistics``, over consecutive batches of the program's size."""
        program: Any = load_program(self.folder / "executorch" / "statistics.pte")
        params = [
            torch.from_numpy(np.ascontiguousarray(weights[n], np.float32)) for n in self.param_names
        ]

        def run(start: int) -> list[np.ndarray]:
            batch = torch.from_numpy(x[start : start + self.batch])
            return [t.numpy() for t in program.forward((*params, batch))]

        starts = range(0, len(x) - self.batch + 1, self.batch)  # full batches only
        reports = ((self.batch, run(start)) for start in starts)
        return merge_batch_statistics(self.manifest["bn_layers"], reports)
