"""Losses against naive per-sample loops written independently here."""

import math

import pytest
import torch

from src.nn.losses import info_nce, nt_xent


def naive_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


def naive_info_nce(q, k, queue, t):
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        pos = math.exp(float(qi @ ki) / t)
        if queue is None:
            negs = [math.exp(float(qi @ (k[j] / k[j].norm())) / t) for j in range(k.shape[0]) if j != i]
        else:
            negs = [math.exp(float(qi @ (queue[j] / queue[j].norm())) / t) for j in range(queue.shape[0])]
        total += -math.log(pos / (pos + sum(negs)))
    return total / q.shape[0]


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_naive_loop(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert float(nt_xent(z1, z2, t)) == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-9)


def test_nt_xent_is_symmetric_and_low_for_aligned_views():
    z1 = torch.randn(8, 16)
    assert float(nt_xent(z1, z1 + 0.01 * torch.randn(8, 16), 0.1)) < float(nt_xent(z1, torch.randn(8, 16), 0.1))
    z2 = torch.randn(8, 16)
    assert float(nt_xent(z1, z2)) == pytest.approx(float(nt_xent(z2, z1)), rel=1e-6)


@pytest.mark.parametrize("use_queue", [True, False])
def test_info_nce_matches_naive_loop(use_queue):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    queue = torch.randn(7, 4, generator=g, dtype=torch.float64) if use_queue else None
    assert float(info_nce(q, k, queue, 0.2)) == pytest.approx(naive_info_nce(q, k, queue, 0.2), rel=1e-9)


def test_losses_reject_non_positive_temperature():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z, z, None, -1.0)
