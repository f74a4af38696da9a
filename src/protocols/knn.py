"""``protocol=knn``: weighted cosine kNN (InstDisc / DINO, :mod:`src.nn.knn`) for several k at once."""

from __future__ import annotations

from src.nn.knn import knn_predict_sweep
from src.nn.metrics import accuracy
from src.protocols import Protocol, Subject, percent


class KNN(Protocol):
    """Top-1 of weighted kNN on frozen features for each k in ``ks`` (``knn_top1_k<k>``): the bank is at most
    ``max_train_items`` evenly spaced images of the labelled train split, the queries the evaluation split (at most
    ``max_val_items``); votes ``exp(cos / temperature)``."""

    name = "knn"

    def __init__(self, ks: list[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 max_train_items: int | None = 10000, max_val_items: int | None = None):
        ks = [int(k) for k in ks]
        if not ks or min(ks) < 1:
            raise ValueError(f"protocols.knn.ks={ks}: give one or more k >= 1, e.g. [10, 20, 100, 200]")
        if temperature <= 0:
            raise ValueError(f"protocols.knn.temperature={temperature} must be > 0")
        self.ks, self.temperature = sorted(set(ks)), float(temperature)
        self.max_train_items, self.max_val_items = max_train_items, max_val_items

    def run(self, subject: Subject) -> dict:
        tx, ty = subject.features("train", self.max_train_items)
        vx, vy = subject.features("val", self.max_val_items)
        device = subject.device
        preds = knn_predict_sweep(tx.to(device), ty.to(device), vx.to(device), subject.num_classes, self.ks,
                                  self.temperature)
        return {f"knn_top1_k{k}": percent(accuracy(p, vy, subject.num_classes)) for k, p in preds.items()}
