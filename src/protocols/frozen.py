"""The figures every run ends with, on frozen features: weighted kNN at one k and the cached linear probe, fitted
on the labelled train split and measured on the evaluation split, and the same two on a seeded held-out part of
the train split (``val_*``: what sweeps and model choices may look at, never the test split).

One implementation, three callers: the end of a training run (``eval.final``), ``python -m src.eval CKPT`` and,
for kNN, the per-epoch monitor. Keys (percent, 2 decimals): ``knn_top1, linear_top1, linear_top5``; with
``holdout_fraction > 0`` also ``val_knn_top1, val_linear_top1, val_linear_top5, eval_holdout_items``; and
``eval_train_items, eval_val_items``. The random-init baseline reports the first three only.
"""

from __future__ import annotations

import torch

from src.nn.knn import knn_top1
from src.nn.linear_probe import train_linear_probe
from src.protocols import Protocol, Subject, percent

Features = tuple[torch.Tensor, torch.Tensor]  # (N x D features, N labels)


def knn_score(train: Features, val: Features, num_classes: int, k: int, temperature: float,
              device: torch.device | str) -> float:
    """Top-1 (%) of weighted cosine kNN (votes ``exp(cos / temperature)``) with ``train`` as the bank."""
    (tx, ty), (vx, vy) = [(f.to(device), y.to(device)) for f, y in (train, val)]
    return knn_top1(tx, ty, vx, vy, num_classes, k, temperature)


def linear_scores(train: Features, val: Features, num_classes: int, epochs: int, lr: float, weight_decay: float,
                  device: torch.device | str) -> dict[str, float]:
    """``{"top1", "top5"}`` (%) of the L-BFGS logistic-regression probe (:mod:`src.nn.linear_probe`)."""
    (tx, ty), (vx, vy) = [(f.to(device), y.to(device)) for f, y in (train, val)]
    return train_linear_probe(tx, ty, vx, vy, num_classes, epochs, lr, weight_decay)


def holdout_split(features: Features, fraction: float, seed: int) -> tuple[Features, Features]:
    """(kept, held out): a seeded random ``fraction`` of the labelled train split is held out as queries."""
    x, y = features
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n = max(1, int(round(fraction * x.shape[0])))
    return (x[order[n:]], y[order[n:]]), (x[order[:n]], y[order[:n]])


class FrozenEvaluation(Protocol):
    """kNN (``k``, ``temperature``) and the linear probe (``linear_epochs`` L-BFGS iterations, ``linear_lr``,
    ``linear_weight_decay``) on at most ``max_train_items`` evenly spaced train images and ``max_val_items`` of the
    evaluation split; ``holdout_fraction`` of the train features (seeded by ``seed``) held out for ``val_*``."""

    name = "final"
    own_file = False  # its figures are the run's results.json / the checkpoint's .eval.json

    def __init__(self, k: int = 200, temperature: float = 0.07, linear_epochs: int = 100, linear_lr: float = 1.0,
                 linear_weight_decay: float = 1e-3, max_train_items: int | None = None,
                 max_val_items: int | None = None, holdout_fraction: float = 0.0, seed: int = 0):
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"eval.final.holdout_fraction={holdout_fraction} must be in [0, 1)")
        self.k, self.temperature = int(k), float(temperature)
        self.linear_epochs, self.linear_lr, self.linear_weight_decay = int(linear_epochs), linear_lr, linear_weight_decay
        self.max_train_items, self.max_val_items = max_train_items, max_val_items
        self.holdout_fraction, self.seed = float(holdout_fraction), int(seed)

    def scores(self, train: Features, val: Features, num_classes: int, device, prefix: str = "") -> dict[str, float]:
        linear = linear_scores(train, val, num_classes, self.linear_epochs, self.linear_lr, self.linear_weight_decay,
                               device)
        return {f"{prefix}knn_top1": percent(knn_score(train, val, num_classes, self.k, self.temperature, device)),
                f"{prefix}linear_top1": percent(linear["top1"]), f"{prefix}linear_top5": percent(linear["top5"])}

    def run_baseline(self, subject: Subject) -> dict:
        train = subject.features("train", self.max_train_items)
        val = subject.features("val", self.max_val_items)
        return self.scores(train, val, subject.num_classes, subject.device)

    def run(self, subject: Subject) -> dict:
        train = subject.features("train", self.max_train_items)
        val = subject.features("val", self.max_val_items)
        out = self.scores(train, val, subject.num_classes, subject.device)
        if self.holdout_fraction > 0:
            rest, held = holdout_split(train, self.holdout_fraction, self.seed)
            out.update(self.scores(rest, held, subject.num_classes, subject.device, "val_"))
            out["eval_holdout_items"] = int(held[0].shape[0])
        return {**out, "eval_train_items": int(train[0].shape[0]), "eval_val_items": int(val[0].shape[0])}
