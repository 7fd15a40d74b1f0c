"""Losses taking int64 class indices: cross-entropy ("ce", one logit per class) or binary cross-entropy ("bce",
one logit for class 1), weighted by `class_weights` / `pos_weight` from the training labels.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.core import as_label_tensor, is_one_logit


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, scaled to mean 1 (for `CrossEntropyLoss(weight=...)`)."""
    counts = torch.bincount(as_label_tensor(labels), minlength=num_classes).float()
    if (counts == 0).any():
        raise ValueError(f"Some class has no training images (counts per class: {counts.tolist()}).")
    weights = counts.sum() / (num_classes * counts)
    return weights / weights.mean()


def pos_weight(labels) -> torch.Tensor:
    """n_negative / n_positive, shape (1,), for `BCEWithLogitsLoss(pos_weight=...)`."""
    labels = as_label_tensor(labels)
    n_pos = int((labels == 1).sum())
    if n_pos == 0:
        raise ValueError("No positive training images: pos_weight is undefined.")
    return torch.tensor([(len(labels) - n_pos) / n_pos], dtype=torch.float32)


class BCEWithIndexTargets(nn.Module):
    """`BCEWithLogitsLoss` for a 1-logit model taking int64 class indices."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not is_one_logit(logits):
            raise ValueError(f"BCE expects one logit per image, got logits of shape {tuple(logits.shape)}. "
                             "Use make_criterion('ce') for a model with one output per class.")
        return self.loss(logits, y.to(logits.dtype).reshape(logits.shape))


def make_criterion(kind: str = "ce", *, class_weights: torch.Tensor | None = None,
                   pos_weight: torch.Tensor | float | None = None) -> nn.Module:
    """A loss `(logits, y_int64) -> scalar`: "ce" on C logits (`class_weights` (C,)) or "bce" on 1 logit
    (`pos_weight`, e.g. n_neg / n_pos, up-weights class 1)."""
    if kind == "ce":
        if pos_weight is not None:
            raise ValueError("pos_weight is for kind='bce'; with 'ce' use class_weights.")
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight)
    if kind == "bce":
        if class_weights is not None:
            raise ValueError("class_weights is for kind='ce'; with 'bce' use pos_weight (n_neg / n_pos).")
        pw = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32).reshape(1)
        return BCEWithIndexTargets(pos_weight=pw)
    raise ValueError(f"Unknown criterion kind {kind!r}. Known: ce, bce")
