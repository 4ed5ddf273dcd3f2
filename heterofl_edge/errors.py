"""The two kinds of errors heterofl-edge raises.

``HeteroFLError`` is the user's mistake or the world's (a bad level, a missing
data directory, a corrupt file): it carries a one-line message naming the
problem and a hint saying what to do. Boundaries (the CLI, the HTTP API) turn it
into a clear message and a non-zero exit code or a 4xx reply.

``InternalError`` is a broken invariant inside heterofl-edge itself: a bug to
report, never the user's fault.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "HeteroFLError",
    "InternalError",
    "MissingExtra",
    "ModelError",
    "UpdateError",
]


class HeteroFLError(Exception):
    """A problem the user can fix; ``hint`` says how, ``code`` names it for programs."""

    code = "invalid"

    def __init__(self, message: str, hint: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(HeteroFLError):
    """An unknown model, level, rate, mode or option value."""

    code = "bad_config"


class DataError(HeteroFLError):
    """A data set that is missing, unreadable or corrupt."""

    code = "bad_data"


class MissingExtra(HeteroFLError):
    """A part of heterofl-edge whose pip extra is not installed (``needed_by`` names the part).

    The command line names the command instead: ``'heterofl-edge export' needs the
    'server' extra: pip install 'heterofl-edge[server]'``.
    """

    code = "missing_extra"

    def __init__(self, extra: str, needed_by: str = "this command") -> None:
        self.extra = extra
        super().__init__(
            f"{needed_by} needs the {extra!r} extra: pip install 'heterofl-edge[{extra}]'"
        )


class ModelError(HeteroFLError):
    """A model the toolkit cannot use: it does not build, or a tensor it cannot slice."""


class UpdateError(HeteroFLError):
    """A client update that does not fit its level (names, shapes, dtypes, values).

    ``code`` is one of ``wrong_tensors``, ``bad_dtype``, ``bad_shape``,
    ``not_finite``, ``bad_labels``, ``bad_statistics``.
    """

    code = "bad_update"


class InternalError(RuntimeError):
    """A broken invariant in heterofl-edge: please report it as a bug."""
