"""Signs of representation collapse, computed on embeddings (Lightning-free).

- :func:`std_ratio`: the mean per-dimension standard deviation of L2-normalised embeddings, times sqrt(d). About 1
  when the embeddings spread over the sphere (std ~ 1/sqrt(d), as in the SimSiam paper's collapse check), near 0
  when every image maps to the same point.
- :func:`rankme`: RankMe (Garrido et al. 2023), the exponential of the entropy of the normalised singular values:
  the effective number of dimensions used, between 1 and min(N, d).
- :func:`alignment` and :func:`uniformity` (Wang & Isola 2020): E||f(x) - f(x+)||^2 over positive pairs (lower is
  better) and log E exp(-2 ||f(x) - f(y)||^2) over all pairs (lower is more uniform; 0 when collapsed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def std_ratio(z: torch.Tensor) -> float:
    z = F.normalize(z.float(), dim=1)
    return float(z.std(dim=0).mean()) * math.sqrt(z.shape[1])


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> float:
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return float((z1 - z2).pow(2).sum(dim=1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    z = F.normalize(z.float(), dim=1)
    return float(torch.pdist(z).pow(2).mul(-t).exp().mean().log())
