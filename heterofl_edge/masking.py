"""Which tokens the masked language model hides in a batch (numpy alone, no torch).

The paper's language model (section 4, Table 6) is trained as a masked
language model: a Bernoulli(``mask_rate``) share of the input tokens is
replaced by the mask token (one past the vocabulary) and the model predicts
them. The in-process simulation, the coordinator's evaluation and the Python
device all draw the masks here, from ``batching.SplitMix64`` (draw k hides
token k of the batch, in row-major order, when its uniform is below
``mask_rate``), so that the same seed hides the same tokens everywhere.

Which positions are scored is a choice: ``masked`` (the masked positions
only, the usual masked-LM objective and the default) or ``all`` (every
position, as the official HeteroFL code computes its loss and perplexity).
Positions that are not scored get the target ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from heterofl_edge.batching import SEED_LIMIT, SplitMix64

__all__ = ["IGNORE_INDEX", "MASK_STREAM", "MaskedRows", "ScoredPositions", "TokenMasker"]

# Targets equal to this are not scored (torch's cross-entropy default, kept by the
# exported training programs too).
IGNORE_INDEX = -100
# A session's mask draws come from the seed XOR this ("mask"), apart from its batch order.
MASK_STREAM = 0x6D61736B


class ScoredPositions(StrEnum):
    masked = "masked"  # the masked positions only (the usual masked-LM objective)
    all = "all"  # every position (the official HeteroFL code's loss and perplexity)


@dataclass(frozen=True)
class MaskedRows:
    inputs: np.ndarray  # the rows with the hidden tokens replaced by the mask token
    targets: np.ndarray  # the rows, IGNORE_INDEX where nothing is scored
    scored: int  # positions that count in the loss


class TokenMasker:
    """One stream of masks (a local session, or an evaluation), seeded once."""

    def __init__(
        self,
        mask_token: int,
        mask_rate: float,
        positions: ScoredPositions = ScoredPositions.masked,
        seed: int = 0,
    ) -> None:
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask rate {mask_rate} is outside (0, 1)")
        self.mask_token = mask_token
        self.mask_rate = mask_rate
        self.positions = ScoredPositions(positions)
        self._rng = SplitMix64((seed ^ MASK_STREAM) % SEED_LIMIT)

    def hidden(self, shape: tuple[int, ...]) -> np.ndarray:
        """A boolean array of ``shape``: True where the next batch's token is hidden."""
        count = int(np.prod(shape, dtype=np.int64))
        return (self._rng.uniforms(count) < self.mask_rate).reshape(shape)

    def corrupt(self, rows: np.ndarray) -> MaskedRows:
        """The next batch of token rows (int64), masked, with the targets to score."""
        hidden = self.hidden(tuple(rows.shape))
        inputs = np.where(hidden, np.int64(self.mask_token), rows)
        if self.positions is ScoredPositions.all:
            return MaskedRows(inputs, rows.astype(np.int64, copy=True), int(rows.size))
        targets = np.where(hidden, rows, np.int64(IGNORE_INDEX))
        return MaskedRows(inputs, targets, int(hidden.sum()))
