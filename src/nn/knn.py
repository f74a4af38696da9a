"""Weighted k-nearest-neighbour classifier on frozen features.

This is the weighted kNN of Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", InstDisc), the protocol also used by DINO: features are L2-normalised, the ``k`` most
cosine-similar training samples vote for their label with weight ``exp(sim / temperature)``, and the class
with the largest summed weight wins.

Pure tensor code (no Lightning). Queries are processed in chunks, so memory is bounded by
``chunk_size x num_train`` similarities rather than ``num_query x num_train``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.nn.metrics import accuracy


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
def knn_predict_sweep(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    ks: list[int] | tuple[int, ...] = (200,),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted labels (Q,) of ``query_features`` (Q, D) for each ``k`` in ``ks``, from a bank ``train_features``
    (N, D) / ``train_labels`` (N,). The neighbours are found once, for the largest k; each ``k`` (clipped to N)
    votes with its own top-k. Runs on the device of ``query_features`` (the bank is moved there)."""
    if train_features.shape[0] == 0:
        raise ValueError("knn_predict needs at least one training sample")
    device = query_features.device
    bank = F.normalize(_as_float(train_features).to(device), dim=1)
    bank_labels = train_labels.to(device=device, dtype=torch.long)
    queries = F.normalize(_as_float(query_features), dim=1).to(bank.dtype)
    clipped = {k: max(1, min(int(k), bank.shape[0])) for k in ks}
    largest = max(clipped.values())

    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T  # (q, N) cosine similarities
        top_sim, top_idx = sim.topk(largest, dim=1)  # sorted: the first k columns are the top k
        weights, labels = (top_sim / temperature).exp(), bank_labels[top_idx]
        for k, kk in clipped.items():
            votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=device)
            votes.scatter_add_(1, labels[:, :kk], weights[:, :kk])
            preds[k].append(votes.argmax(dim=1))
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return {k: torch.cat(p) if p else empty for k, p in preds.items()}


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict labels of ``query_features`` (Q, D) from a bank ``train_features`` (N, D) / ``train_labels`` (N,).

    Runs on the device of ``query_features`` (the bank is moved there). ``k`` is clipped to N.
    Returns predicted labels (Q,) as a long tensor.
    """
    return knn_predict_sweep(train_features, train_labels, query_features, num_classes, (k,), temperature,
                             chunk_size)[k]


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of :func:`knn_predict` on labelled queries."""
    if query_features.shape[0] == 0:
        return 0.0
    pred = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature, chunk_size)
    return accuracy(pred, query_labels, num_classes)
