"""Evaluating the global model on held-out data, on the round engine's thread."""

from __future__ import annotations

from pathlib import Path

import torch

from heterofl_edge.models import Architecture

__all__ = ["HeldOutEvaluation"]


class HeldOutEvaluation:
    """Loss and accuracy of the global model on the MNIST test set (loaded on first use).

    A failure here (a missing folder, a corrupt file) is a fault on the
    server: the engine logs it and records it in the round's result.
    """

    def __init__(
        self, arch: Architecture, global_rate: float, data_dir: Path, examples: int | None
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.data_dir = data_dir
        self.examples = examples
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def _test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            from heterofl_edge.data import load_mnist

            data = load_mnist(self.data_dir)
            limit = self.examples or len(data.test_labels)
            self._data = data.test_images[:limit], data.test_labels[:limit]
        return self._data

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float | None]:
        from heterofl_edge.training import evaluate

        images, labels = self._test_data()
        model = self.arch.build(self.global_rate, self.global_rate)
        model.load_state_dict(state)
        result = evaluate(model, images, labels)
        return {
            "global_loss": result.loss,
            "global_accuracy": result.accuracy,
            "test_examples": float(result.num_examples),
        }
