"""Classification accuracy in percent, with torchmetrics (micro-averaged: the share of samples right)."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_accuracy


def accuracy(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, top_k: int = 1) -> float:
    """Top-``top_k`` accuracy (%) of ``scores`` (N, C) or predicted labels (N,) against ``labels`` (N,); 0 for no
    samples. ``top_k`` is clipped to the number of classes."""
    if labels.numel() == 0:
        return 0.0
    labels = labels.to(device=scores.device, dtype=torch.long)
    if scores.dim() == 1:
        return 100.0 * float(multiclass_accuracy(scores.long(), labels, num_classes, average="micro"))
    k = min(top_k, scores.shape[1])
    return 100.0 * float(multiclass_accuracy(scores.float(), labels, scores.shape[1], top_k=k, average="micro"))
