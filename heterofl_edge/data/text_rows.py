"""WikiText-2 (word level) tokenised as the paper's official code does, with numpy alone.

* Every line of a split becomes its whitespace-separated words followed by
  ``<eos>`` (empty lines too: they give a lone ``<eos>``). Lines are the file's
  own lines, as Python's text mode reads them (not ``str.splitlines``, which
  also breaks at rarer separators such as U+2028; WikiText-2 has none).
* The vocabulary is built over the train, valid and test splits in that
  order: ids 0 and 1 are the official vocabulary's own ``<ukn>`` and ``<eos>``,
  then every other word in order of first appearance. WikiText-2's 33,278
  types (``<eos>`` and ``<unk>`` included) give 33,279 ids, the number the
  paper's Table 9 counts and ``TRANSFORMER_DEFAULTS["num_tokens"]`` holds;
  the model's mask token is id 33,279, one past the vocabulary.
* Each split's token stream is cut into rows of ``sequence_length`` (64, paper
  Table 6) consecutive tokens; the stream's last partial row is dropped.

The three files are read from the folder given by the caller: ``train.txt``,
``valid.txt``, ``test.txt`` (or their names in the original archive,
``wiki.train.tokens`` and so on). Nothing is downloaded.

A device reads its text with ``read_wikitext2_rows`` (no torch);
``heterofl_edge.data.wikitext2`` wraps the same rows as the data set the
simulation and the coordinator use.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from heterofl_edge.data.checksums import md5_of
from heterofl_edge.errors import DataError

__all__ = [
    "SPLITS",
    "WIKITEXT2_FILES",
    "WikiText2Rows",
    "check_wikitext2_files",
    "read_wikitext2_rows",
    "rows_of",
    "tokenise",
]

SPLITS = ("train", "valid", "test")
# file -> md5 of the word-level splits as distributed
WIKITEXT2_FILES = {
    "train.txt": "34a77ebe59551b3a3b3d8c0a2797c976",
    "valid.txt": "d756d22ab2310e7e60c094bea5c5a8eb",
    "test.txt": "781c9418ab9414bd09e4aad825aae752",
}
SPECIALS = ("<ukn>", "<eos>")
HINT = (
    "pass --data-dir DIR with train.txt, valid.txt and test.txt of word-level WikiText-2 "
    "(wiki.train.tokens etc. are accepted too) and check them with "
    "'heterofl-edge data check --data wikitext2 --data-dir DIR'"
)


def _locate(folder: Path, split: str) -> Path:
    for candidate in (folder / f"{split}.txt", folder / f"wiki.{split}.tokens"):
        if candidate.is_file():
            return candidate
    raise DataError(f"WikiText-2 file {split}.txt not found in {folder}", HINT)


def _lines(path: Path) -> Iterable[str]:
    try:
        with path.open(encoding="utf-8") as handle:
            yield from handle
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read {path}: {exc}", "the file is damaged; fetch it again"
        ) from None


def tokenise(
    paths: Iterable[Path], vocabulary: dict[str, int] | None = None
) -> tuple[list[np.ndarray], dict[str, int]]:
    """Token ids of each file and the vocabulary (symbol -> id) grown over them in order."""
    vocab = dict(vocabulary) if vocabulary is not None else {s: i for i, s in enumerate(SPECIALS)}
    streams = []
    for path in paths:
        ids: list[int] = []
        for line in _lines(path):
            for word in [*line.split(), "<eos>"]:
                index = vocab.get(word)
                if index is None:
                    index = vocab[word] = len(vocab)
                ids.append(index)
        streams.append(np.asarray(ids, dtype=np.int64))
    return streams, vocab


def rows_of(stream: np.ndarray, sequence_length: int) -> np.ndarray:
    """The stream cut into rows of ``sequence_length`` tokens, the last partial row dropped."""
    usable = len(stream) // sequence_length * sequence_length
    return stream[:usable].reshape(-1, sequence_length).copy()


@dataclass(frozen=True)
class WikiText2Rows:
    """The three splits as int64 rows [N, sequence_length] of ids into ``vocabulary``."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocabulary: tuple[str, ...]


def read_wikitext2_rows(data_dir: str | Path | None, sequence_length: int = 64) -> WikiText2Rows:
    """Tokenise the three files in ``data_dir`` and cut each split into rows."""
    if data_dir is None or str(data_dir) == "":
        raise DataError("no WikiText-2 directory given", HINT)
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"WikiText-2 directory {folder} does not exist", HINT)
    if sequence_length < 1:
        raise DataError(f"sequence length must be at least 1, got {sequence_length}")
    streams, vocab = tokenise([_locate(folder, split) for split in SPLITS])
    train, valid, test = (rows_of(s, sequence_length) for s in streams)
    return WikiText2Rows(train, valid, test, tuple(vocab))


def check_wikitext2_files(data_dir: str | Path) -> dict[str, str]:
    """md5 of each split against the distributed files: name -> 'ok' or a problem."""
    folder = Path(data_dir).expanduser()
    report = {}
    for name, expected in WIKITEXT2_FILES.items():
        try:
            path = _locate(folder, name.removesuffix(".txt"))
        except DataError:
            report[name] = "missing"
            continue
        actual = md5_of(path)
        report[path.name] = "ok" if actual == expected else f"md5 {actual}, expected {expected}"
    return report
