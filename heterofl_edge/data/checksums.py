"""Checksums of data files (standard library only, so that devices can use it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["md5_of"]


def md5_of(path: Path) -> str:
    """The md5 of a file, read in chunks (to compare with a distribution's published sums)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
