"""How much memory this process holds, and the most it held since a mark (Linux ``/proc``).

A device with ``--max-memory-mb`` tells the coordinator what its process
holds before it loads a level (``resident_mb``), and reports the peak of every
task it runs (``PeakMemory``), so that an operator sees how close a level
comes to the limit. Both read ``/proc/self``; where it is missing (not
Linux) they fall back to ``getrusage``, or say ``None``.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

__all__ = ["PeakMemory", "resident_mb"]

_PROC = Path("/proc/self")
_MB = 2**20


def resident_mb() -> float | None:
    """The process's resident set now, in MiB (None where ``/proc`` is missing)."""
    try:
        pages = int((_PROC / "statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / _MB


def _status_mb(field: str) -> float | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / _MB  # the kernel writes kB
    except (OSError, IndexError, ValueError):
        return None
    return None


def _lifetime_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak * 1024 / _MB  # bytes vs kB


class PeakMemory:
    """The largest resident set since ``mark()`` (``VmHWM``, reset through ``clear_refs``).

    Where the kernel does not let the mark reset the peak, ``peak_mb`` is the
    process's lifetime peak (``getrusage``): never below the true figure.
    """

    def __init__(self) -> None:
        self.resets = False

    def mark(self) -> None:
        """Start a new measurement: the peak from now on."""
        try:
            (_PROC / "clear_refs").write_text("5")  # 5: reset the peak resident set size
            self.resets = True
        except OSError:
            self.resets = False

    def peak_mb(self) -> float:
        """The peak resident set since ``mark()`` (or since the process started), in MiB."""
        if self.resets:
            found = _status_mb("VmHWM")
            if found is not None:
                return found
        return _lifetime_peak_mb()
