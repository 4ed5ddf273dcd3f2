"""Export errors: the user's (``ExportError``) and a failed check against PyTorch."""

from __future__ import annotations

from heterofl_edge.errors import HeteroFLError

__all__ = ["ExportError", "FrozenWeightsError", "VerificationError"]


class ExportError(HeteroFLError):
    """An export that cannot be done: bad output folder, a model a backend cannot run."""


class FrozenWeightsError(ExportError):
    """A delegate that holds a trainable tensor as a constant of its own.

    Training would update the program's named parameter while the delegate
    keeps computing with the copy it baked in at export.
    """

    code = "frozen_weights"


class VerificationError(HeteroFLError):
    """An artifact whose results differ from eager PyTorch beyond the tolerance."""
