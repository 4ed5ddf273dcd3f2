"""Local training on the ONNX artifacts with onnxruntime and numpy alone (no torch).

``OnnxLevel`` wraps one level's manifest and its three programs:
``train`` runs E epochs of the ``train_step`` graph (SGD with momentum, weight
decay, clipping, masked cross-entropy; momentum reset every session),
``statistics`` runs the statistics graph over consecutive batches and merges
the per-batch moments exactly, ``evaluate`` returns logits.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from heterofl_edge.batching import epoch_batches, stats_batches

__all__ = ["LocalResult", "OnnxLevel", "merge_batch_statistics", "merge_moments"]


@dataclass(frozen=True)
class LocalResult:
    weights: dict[str, np.ndarray]
    num_examples: int
    steps: int
    loss: float
    accuracy: float


def merge_moments(
    a: tuple[int, np.ndarray, np.ndarray], b: tuple[int, np.ndarray, np.ndarray]
) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, biased var) of the union of two disjoint sets (Chan et al.)."""
    na, ma, va = a
    nb, mb, vb = b
    n = na + nb
    delta = mb.astype(np.float64) - ma
    mean = ma + delta * (nb / n)
    m2 = va * na + vb.astype(np.float64) * nb + delta**2 * (na * nb / n)
    return n, mean, m2 / n


def merge_batch_statistics(
    layers: list[str], reports: Iterable[tuple[int, Sequence[Any]]]
) -> dict[str, np.ndarray]:
    """Merge a statistics program's per-batch outputs into the upload's tensors.

    Each report is (examples in the batch, [mean_1, var_1, ..., mean_L, var_L]);
    the result holds LAYER.count / .mean / .var for every sBN layer.
    """
    merged: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for examples, out in reports:
        for i, layer in enumerate(layers):
            moments = (
                examples,
                np.asarray(out[2 * i], np.float64),
                np.asarray(out[2 * i + 1], np.float64),
            )
            merged[layer] = merge_moments(merged[layer], moments) if layer in merged else moments
    result: dict[str, np.ndarray] = {}
    for layer, (count, mean, var) in merged.items():
        result[f"{layer}.count"] = np.array(float(count), np.float32)
        result[f"{layer}.mean"] = mean.astype(np.float32)
        result[f"{layer}.var"] = var.astype(np.float32)
    return result


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

    def train(
        self,
        weights: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        labels: list[int],
        lr: float,
        epochs: int,
        batch_size: int,
        seed: int,
    ) -> LocalResult:
        session = self._session("train_step")
        names = [i.name for i in session.get_inputs()]
        params = [np.ascontiguousarray(weights[n], np.float32) for n in self.param_names]
        momenta = [np.zeros_like(p) for p in params]
        mask = self.label_mask(labels)
        rate = np.array(lr, np.float32)
        n = len(self.param_names)
        steps, loss_sum, correct = 0, 0.0, 0
        for batch in epoch_batches(len(y), epochs, batch_size, seed):
            out = session.run(
                None,
                dict(zip(names, [*params, *momenta, x[batch], y[batch], mask, rate], strict=True)),
            )
            params, momenta = list(out[1 : 1 + n]), list(out[1 + n : 1 + 2 * n])
            steps += 1
            loss_sum += float(out[0]) * len(batch)
            correct += int(out[-1])
        seen = max(1, steps and len(y) * epochs)
        return LocalResult(
            dict(zip(self.param_names, params, strict=True)),
            len(y),
            steps,
            loss_sum / seen,
            correct / seen,
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
