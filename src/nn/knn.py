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


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.no_grad()
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
    if train_features.shape[0] == 0:
        raise ValueError("knn_predict needs at least one training sample")
    device = query_features.device
    bank = F.normalize(_as_float(train_features).to(device), dim=1)
    bank_labels = train_labels.to(device=device, dtype=torch.long)
    queries = F.normalize(_as_float(query_features), dim=1).to(bank.dtype)
    k = max(1, min(int(k), bank.shape[0]))

    preds = []
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T  # (q, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(preds)


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
    correct = (pred == query_labels.to(pred.device)).float().mean()
    return float(correct) * 100.0
