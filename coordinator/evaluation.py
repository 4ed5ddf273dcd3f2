"""Evaluating the global model on held-out data, on the round engine's thread."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from heterofl_edge.engine import Stopped
from heterofl_edge.models import Architecture

__all__ = ["HeldOutEvaluation"]


class HeldOutEvaluation:
    """The global model scored on a data set's test split (loaded on first use).

    The data set is any the registry knows (``mnist``, ``imagefolder``,
    ``wikitext2``, a user's), loaded to fit the model's input; the model's task
    scores it (loss and accuracy; perplexity for a language model). A failure
    here (a missing folder, a corrupt file) is a fault on the server: the
    engine logs it and records it in the round's result. With ``examples``
    set, it scores the test examples ``simulate --test-examples`` scores for the
    same seed.
    """

    def __init__(
        self,
        arch: Architecture,
        global_rate: float,
        data_dir: Path,
        examples: int | None,
        data: str = "mnist",
        seed: int = 0,
    ) -> None:
        self.arch = arch
        self.global_rate = global_rate
        self.data_dir = data_dir
        self.examples = examples
        self.data = data
        self.seed = seed
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    def _test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            from heterofl_edge.data.registry import get_dataset
            from heterofl_edge.tasks import check_compatible, task_for

            loaded = get_dataset(self.data, self.data_dir, fit_to=self.arch.input_shape)
            check_compatible(self.arch, loaded)
            task = task_for(self.arch)
            keep = torch.from_numpy(task.held_out(len(loaded.test_y), self.examples, self.seed))
            self._test = loaded.test_x[keep], loaded.test_y[keep]
        return self._test

    def __call__(
        self, state: dict[str, torch.Tensor], stopping: Callable[[], bool] = lambda: False
    ) -> dict[str, float | None]:
        """Scores of ``state``; ``Stopped`` as soon as ``stopping()`` (checked every batch)."""
        from heterofl_edge.tasks import task_for

        inputs, targets = self._test_data()
        model = self.arch.build(self.global_rate, self.global_rate)
        model.load_state_dict(state)

        def check(module: torch.nn.Module, args: object) -> None:
            if stopping():
                raise Stopped("the coordinator is stopping")

        model.register_forward_pre_hook(check)  # before every batch's forward pass
        task = task_for(self.arch)
        result = task.evaluate(model, inputs, targets)
        scores: dict[str, float | None] = {
            "global_loss": result.loss,
            "global_accuracy": result.accuracy,
            "test_examples": float(result.num_examples),
        }
        if task.metric != "accuracy":
            scores[f"global_{task.metric}"] = task.metric_of(result)
        return scores
