"""Self-supervised losses as pure functions of tensors (no Lightning, no config).

Distributed variants gather explicitly with :mod:`src.utils.distributed` and equal the
single-process loss at world size 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.utils import distributed as du


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = False) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

    ``z1``, ``z2``: (N, D) projections of two views; row i of each is a positive pair. For each of the
    2N anchors, the positive is its partner and the negatives are the other 2N - 2 samples
        l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t)
    and the loss is the mean over the 2N anchors. With ``gather=True`` the candidates are the
    projections of all processes (labels offset by rank); the anchors stay local, so the mean of the
    per-rank losses is the loss of the global batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = z1.shape[0]
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    z = torch.cat([z1, z2])  # 2N x D, anchors [view1; view2]
    z1_all = du.gather_with_grad(z1) if gather else z1
    z2_all = du.gather_with_grad(z2) if gather else z2
    candidates = torch.cat([z1_all, z2_all])  # 2M x D, M = world * N
    m = z1_all.shape[0]
    offset = du.rank() * n if gather else 0
    logits = torch.einsum("ad,cd->ac", z, candidates) / temperature  # 2N x 2M
    idx = torch.arange(n, device=z.device) + offset
    self_idx = torch.cat([idx, idx + m])  # where each anchor sits among the candidates
    pos_idx = torch.cat([idx + m, idx])  # its partner view
    logits[torch.arange(2 * n, device=z.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


def info_nce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2
) -> torch.Tensor:
    """InfoNCE of MoCo (He et al. 2020, eq. 1): one positive key per query against K queued negatives.

    ``query``, ``key``: (N, D); ``queue``: (K, D) negatives or None, in which case the other keys of
    the batch are the negatives (N-way classification, MoCo v3 style). Inputs are L2-normalised here;
    the key is used as given (callers detach it). Mean over the N queries.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    if queue is None:
        logits = torch.einsum("nc,mc->nm", q, k)  # N x N, positives on the diagonal
    else:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # N x 1
        l_neg = torch.einsum("nc,kc->nk", q, F.normalize(queue, dim=1))  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1)  # N x (1 + K), positive in column 0
    labels = torch.arange(q.shape[0], device=q.device) if queue is None else q.new_zeros(q.shape[0], dtype=torch.long)
    return F.cross_entropy(logits / temperature, labels)
