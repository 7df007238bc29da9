"""Losses of the reference models (twin: paddle_impl/losses.py).

Cross-entropy over the CLASS axis (dim 1 of NCHW logits), pixels equal to `ignore_index` excluded, mean over the
non-ignored pixels (torch's default, used by semseg). Each model's total loss is a weighted sum of terms; the terms
are returned separately so the alignment can compare every one of them.
"""
from __future__ import annotations

import torch.nn.functional as F

from alignment.specs import get_spec

from . import layers as L


def cross_entropy(logits, target, ignore_index: int = 255):
    """logits (N, C, H, W) float, target (N, H, W) int64 -> scalar mean over pixels != ignore_index."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")


def compute_loss(name: str, outputs, target, ignore_index: int = 255) -> dict:
    """outputs: the model's training-mode return (a tensor or a tuple of tensors) -> {'loss', <term>...}.

    The terms, their weights and the label the official criterion ignores come from the model's spec
    (`loss_terms`, `ignore_label`)."""
    spec = get_spec(name)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    terms = spec.loss_terms
    if len(outputs) != len(terms):
        raise ValueError(f"{name}: the model returned {len(outputs)} outputs, its loss expects {len(terms)} "
                         f"({', '.join(t for t, _ in terms)})")
    own = spec.ignore_label
    if own is not None:
        target = L.relabel(target, ignore_index, own)
        ignore_index = own
    result = {}
    total = 0.0
    for (term, weight), out in zip(terms, outputs):
        result[term] = cross_entropy(out, target, ignore_index)
        total = total + weight * result[term]
    result["loss"] = total
    return result
