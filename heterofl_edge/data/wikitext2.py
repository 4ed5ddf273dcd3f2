"""WikiText-2 as the data set the simulation and the coordinator train on (torch tensors).

The text is read and tokenised in ``heterofl_edge.data.text_rows`` (numpy
alone, which devices use); see there for the official code's tokenisation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from heterofl_edge.data.base import LanguageModelData
from heterofl_edge.data.text_rows import (
    WIKITEXT2_FILES,
    check_wikitext2_files,
    read_wikitext2_rows,
)

__all__ = ["WIKITEXT2_FILES", "check_wikitext2_files", "load_wikitext2"]


def load_wikitext2(data_dir: str | Path | None, sequence_length: int = 64) -> LanguageModelData:
    """The three splits as rows of ``sequence_length`` token ids, with the vocabulary."""
    rows = read_wikitext2_rows(data_dir, sequence_length)
    train, valid, test = (torch.from_numpy(r) for r in (rows.train, rows.valid, rows.test))
    return LanguageModelData(train, valid, test, rows.vocabulary)
