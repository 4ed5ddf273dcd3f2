"""Masked cross-entropy (the paper's "masking trick" for non-IID data)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["label_mask", "masked_cross_entropy"]


def label_mask(labels: Iterable[int], num_classes: int) -> torch.Tensor:
    """A float vector with 1 at the labels a client holds and 0 elsewhere."""
    mask = torch.zeros(num_classes)
    mask[torch.tensor(sorted(set(labels)), dtype=torch.long)] = 1.0
    return mask


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy after zeroing the logits of labels outside ``mask``.

    As in the official code, masked logits are set to 0 (not minus infinity).
    A mask of ones (or ``None``) gives the plain cross-entropy. ``logits`` are
    [N, C] or [N, S, C] with ``target`` [N] or [N, S].
    """
    if mask is not None:
        logits = logits * mask
    if logits.dim() == 3:  # per-token classes: the same mean over all N * S positions
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return F.cross_entropy(logits, target)
