"""Export errors: the user's (``ExportError``) and a failed check against PyTorch."""

from __future__ import annotations

from heterofl_edge.errors import HeteroFLError

__all__ = ["ExportError", "VerificationError"]


class ExportError(HeteroFLError):
    """An export that cannot be done: bad output folder, a model a backend cannot run."""


class VerificationError(HeteroFLError):
    """An artifact whose results differ from eager PyTorch beyond the tolerance."""
