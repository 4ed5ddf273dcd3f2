"""Local training on the ONNX artifacts with onnxruntime and numpy alone (no torch).

``OnnxLevel`` wraps one level's manifest and its three programs:
``train`` runs E epochs of the ``train_step`` graph (SGD with momentum, weight
decay, clipping, masked cross-entropy; momentum reset every session; a
masked language model's token masks from ``training_batches``),
``statistics`` runs the statistics graph over consecutive batches and merges
the per-batch moments exactly, ``evaluate`` returns logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from heterofl_edge.batching import stats_batches
from heterofl_edge.device_runtime import (
    LocalResult,
    TrainingRequest,
    merge_batch_statistics,
    training_batches,
)

__all__ = ["OnnxLevel"]


class OnnxLevel:
    def __init__(self, folder: Path, threads: int = 1) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
        self.param_names = [p["name"] for p in self.manifest["parameters"]]
        self.stat_names = [s["name"] for s in self.manifest["statistics"]]
        self.num_classes = int(self.manifest["num_classes"])
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = threads
        self._options.inter_op_num_threads = 1
        self._sessions: dict[str, ort.InferenceSession] = {}

    def _session(self, program: str) -> ort.InferenceSession:
        if program not in self._sessions:
            path = self.folder / self.manifest["programs"]["onnx"][program]["file"]
            self._sessions[program] = ort.InferenceSession(str(path), self._options)
        return self._sessions[program]

    def label_mask(self, labels: list[int] | None) -> np.ndarray:
        mask = np.zeros(self.num_classes, np.float32)
        mask[labels if labels is not None else slice(None)] = 1.0
        return mask

    def train(self, request: TrainingRequest) -> LocalResult:
        """E local epochs of the training program from ``request.weights``."""
        weights, x, y, labels = request.weights, request.x, request.y, request.labels
        lr, epochs, batch_size, seed = request.lr, request.epochs, request.batch_size, request.seed
        session = self._session("train_step")
        names = [i.name for i in session.get_inputs()]
        params = [np.ascontiguousarray(weights[n], np.float32) for n in self.param_names]
        momenta = [np.zeros_like(p) for p in params]
        mask = self.label_mask(labels)
        rate = np.array(lr, np.float32)
        n = len(self.param_names)
        steps, loss_sum, correct, scored = 0, 0.0, 0, 0
        for batch in training_batches(self.manifest, x, y, epochs, batch_size, seed):
            inputs = [*params, *momenta, batch.inputs, batch.targets, mask, rate]
            out = session.run(None, dict(zip(names, inputs, strict=True)))
            params, momenta = list(out[1 : 1 + n]), list(out[1 + n : 1 + 2 * n])
            steps += 1
            loss_sum += float(out[0]) * batch.scored
            correct += int(out[-1])
            scored += batch.scored
        return LocalResult(
            dict(zip(self.param_names, params, strict=True)),
            len(y),
            steps,
            loss_sum / max(scored, 1),
            correct / max(scored, 1),
        )

    def statistics(self, weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
        """LAYER.count / .mean / .var for every sBN layer over all of ``x``.

        ``count`` is the number of examples: every layer sees the same number of
        positions per example, so it weighs reports exactly when merging.
        """
        session = self._session("statistics")
        names = [i.name for i in session.get_inputs()]
        params = [np.ascontiguousarray(weights[n], np.float32) for n in self.param_names]
        reports = (
            (len(x[part]), session.run(None, dict(zip(names, [*params, x[part]], strict=True))))
            for part in stats_batches(len(x))
        )
        return merge_batch_statistics(self.manifest["bn_layers"], reports)

    def evaluate(self, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        session = self._session("evaluate")
        names = [i.name for i in session.get_inputs()]
        values = [
            np.ascontiguousarray(weights[n], np.float32) for n in self.param_names + self.stat_names
        ]
        return session.run(None, dict(zip(names, [*values, x], strict=True)))[0]
