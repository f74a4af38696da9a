"""Losses against naive per-sample loops written independently here."""

import math

import pytest
import torch

from src.nn.losses import (
    barlow_twins_loss,
    dino_loss,
    info_nce,
    negative_cosine,
    nt_xent,
    sinkhorn,
    swav_loss,
    vicreg_loss,
    vicreg_terms,
)
from src.utils import distributed as du


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


# ---------------------------------------------------------------------------------------------
# Naive references: Python floats and loops over samples / dimensions, on .tolist() copies.


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_negative_cosine(p, z):
    p, z = p.tolist(), z.tolist()
    total = 0.0
    for pi, zi in zip(p, z, strict=True):
        dot = sum(a * b for a, b in zip(pi, zi, strict=True))
        total += -dot / (math.sqrt(sum(a * a for a in pi)) * math.sqrt(sum(b * b for b in zi)))
    return total / len(p)


def column(z, j):
    return [row[j] for row in z]


def mean(xs):
    return sum(xs) / len(xs)


def variance(xs, ddof):
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - ddof)


def naive_barlow(z1, z2, lambd, eps):
    z1, z2 = z1.tolist(), z2.tolist()
    n, d = len(z1), len(z1[0])

    def standardised(z):
        cols = []
        for j in range(d):
            col = column(z, j)
            m, s = mean(col), math.sqrt(variance(col, 0) + eps)
            cols.append([(x - m) / s for x in col])
        return cols  # D lists of N

    a, b = standardised(z1), standardised(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][k] * b[j][k] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def naive_vicreg(z1, z2, eps):
    z1, z2 = z1.tolist(), z2.tolist()
    n, d = len(z1), len(z1[0])
    sq = [(a - b) ** 2 for r1, r2 in zip(z1, z2, strict=True) for a, b in zip(r1, r2, strict=True)]
    inv = sum(sq) / (n * d)

    def var_term(z):
        return mean([max(0.0, 1 - math.sqrt(variance(column(z, j), 1) + eps)) for j in range(d)])

    def cov_term(z):
        means = [mean(column(z, j)) for j in range(d)]
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = sum((z[k][i] - means[i]) * (z[k][j] - means[j]) for k in range(n)) / (n - 1)
                    total += c**2
        return total / d

    return {
        "invariance": inv,
        "variance": (var_term(z1) + var_term(z2)) / 2,
        "covariance": cov_term(z1) + cov_term(z2),
    }


def softmax_row(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def cross_entropy_rows(q, logits, temp):
    """mean over rows of sum_k -q_k log softmax(logits / temp)_k."""
    total = 0.0
    for qb, lb in zip(q, logits, strict=True):
        p = softmax_row([x / temp for x in lb])
        total += -sum(a * math.log(b) for a, b in zip(qb, p, strict=True))
    return total / len(q)


def naive_dino(student, teacher, center, st, tt, include_same_view=False):
    center = center.tolist()
    pairs = []
    for i, t in enumerate(teacher):
        q = [softmax_row([(x - c) / tt for x, c in zip(row, center, strict=True)]) for row in t.tolist()]
        for v, s in enumerate(student):
            if v != i or include_same_view:
                pairs.append(cross_entropy_rows(q, s.tolist(), st))
    return sum(pairs) / len(pairs)


def naive_sinkhorn(scores, epsilon, iterations):
    """Alternating row / column scaling of exp(scores / eps), written on B x K lists of floats."""
    s = scores.tolist()
    b, k = len(s), len(s[0])
    m = max(max(row) for row in s)
    p = [[math.exp((x - m) / epsilon) for x in row] for row in s]  # B x K
    for _ in range(iterations):
        for j in range(k):  # every prototype receives total mass B / K
            col = sum(p[i][j] for i in range(b))
            for i in range(b):
                p[i][j] *= (b / k) / col
        for i in range(b):  # every sample is a distribution
            row = sum(p[i])
            p[i] = [x / row for x in p[i]]
    return p


def naive_swav(high, low, temp, iterations, epsilon, queue=None):
    crops = high + low
    terms = []
    for i, h in enumerate(high):
        scores = h if queue is None else torch.cat([queue[i], h])
        q = naive_sinkhorn(scores, epsilon, iterations)[-h.shape[0] :]
        for v, c in enumerate(crops):
            if v != i:
                terms.append(cross_entropy_rows(q, c.tolist(), temp))
    return sum(terms) / len(terms)


def close(actual, expected, rtol=1e-9, atol=1e-12):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


def orthogonal_standardised(n, d, seed=0):
    """(n, d) with zero-mean, biased-variance-1, mutually uncorrelated columns."""
    a = randn(n, d, seed=seed)
    q, _ = torch.linalg.qr(a - a.mean(dim=0))  # orthonormal columns, orthogonal to the ones vector
    return q * math.sqrt(n)


# ---------------------------------------------------------------------------------------------


def test_all_reduce_helpers_are_identities_at_world_size_one():
    x = torch.randn(3)
    assert du.all_reduce_sum(x) is x and du.all_reduce_max(x) is x


def test_info_nce_gather_equals_local_at_world_size_one():
    q1, k = randn(6, 5, seed=2).requires_grad_(), randn(6, 5, seed=3)
    q2 = q1.detach().clone().requires_grad_()
    local, gathered = info_nce(q1, k, temperature=0.3), info_nce(q2, k, temperature=0.3, gather=True)
    torch.testing.assert_close(gathered, local)
    local.backward()
    gathered.backward()
    torch.testing.assert_close(q2.grad, q1.grad)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q1, k, randn(4, 5), gather=True)


def test_negative_cosine_matches_naive_and_reaches_both_inputs():
    p, z = randn(7, 5, seed=4).requires_grad_(), randn(7, 5, seed=5).requires_grad_()
    loss = negative_cosine(p, z)
    close(loss, naive_negative_cosine(p.detach(), z.detach()))
    loss.backward()
    assert p.grad.abs().sum() > 0 and z.grad.abs().sum() > 0
    close(negative_cosine(p.detach(), 3 * p.detach()), -1.0)


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_matches_naive_loop(lambd):
    z1, z2 = randn(6, 4, seed=6), randn(6, 4, seed=7) + 2
    close(barlow_twins_loss(z1, z2, lambd=lambd), naive_barlow(z1, z2, lambd, 1e-5))
    close(barlow_twins_loss(z1, z2, lambd=lambd, gather=True), naive_barlow(z1, z2, lambd, 1e-5))


def test_barlow_twins_zero_for_identical_standardised_uncorrelated_views():
    z = orthogonal_standardised(16, 5)
    assert float(barlow_twins_loss(z, z)) < 1e-8
    assert float(barlow_twins_loss(z, randn(16, 5, seed=8))) > 0.1


def test_vicreg_terms_match_naive_loop():
    z1, z2 = randn(6, 4, seed=9), 0.3 * randn(6, 4, seed=10)
    naive = naive_vicreg(z1, z2, 1e-4)
    for gather in (False, True):
        terms = vicreg_terms(z1, z2, gather=gather)
        assert set(terms) == {"invariance", "variance", "covariance"}
        for name, value in terms.items():
            assert value.ndim == 0
            close(value, naive[name])
    expected = 2.0 * naive["invariance"] + 3.0 * naive["variance"] + 0.5 * naive["covariance"]
    close(vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=0.5), expected)


def test_vicreg_terms_vanish_where_expected():
    z = 2 * orthogonal_standardised(16, 5)  # std 2 > 1 per dimension, uncorrelated
    terms = vicreg_terms(z, z)
    for name in ("invariance", "variance", "covariance"):
        assert float(terms[name]) < 1e-12, name
    shrunk = vicreg_terms(0.1 * z, 0.1 * z)  # std 0.2 per dimension: hinge active in both branches
    assert float(shrunk["variance"]) > 0.7


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_matches_naive_loop(n_local):
    g = [randn(5, 6, seed=20 + v) for v in range(2 + n_local)]
    t = [randn(5, 6, seed=30 + i) for i in range(2)]
    center = 0.1 * randn(6, seed=40)
    loss = dino_loss(g, t, center, student_temp=0.2, teacher_temp=0.05)
    close(loss, naive_dino(g, t, center, 0.2, 0.05))
    close(dino_loss(g, t, center.unsqueeze(0), 0.2, 0.05), naive_dino(g, t, center, 0.2, 0.05))


def test_dino_skips_same_view_pairs_and_stops_teacher_gradient():
    s = [randn(4, 5, seed=50 + v).requires_grad_() for v in range(2)]
    t = [randn(4, 5, seed=60 + i).requires_grad_() for i in range(2)]
    center = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    loss = dino_loss(s, t, center)
    close(loss, naive_dino(s, t, center.detach(), 0.1, 0.04))
    with_same_view = naive_dino(s, t, center.detach(), 0.1, 0.04, include_same_view=True)
    assert abs(float(loss.detach()) - with_same_view) > 1e-3
    loss.backward()
    assert all(x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t) and center.grad is None


def test_dino_low_precision_inputs_give_float32():
    s = [torch.randn(4, 8).bfloat16() for _ in range(3)]
    loss = dino_loss(s, [x.clone() for x in s[:2]], torch.zeros(8).bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_dino_rejects_bad_view_lists():
    x = [torch.randn(2, 3)]
    with pytest.raises(ValueError, match="student"):
        dino_loss(x, x + x, torch.zeros(3))
    with pytest.raises(ValueError, match="pair"):
        dino_loss(x, x, torch.zeros(3))


def test_sinkhorn_matches_naive_loop_and_is_a_distribution_per_row():
    scores = 0.5 * randn(8, 4, seed=70)
    q = sinkhorn(scores, epsilon=0.1, iterations=3)
    assert q.shape == (8, 4)
    torch.testing.assert_close(q, torch.tensor(naive_sinkhorn(scores, 0.1, 3), dtype=q.dtype))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(8, dtype=q.dtype))


def test_sinkhorn_converges_to_equipartition():
    scores = torch.nn.functional.normalize(randn(12, 4, seed=71), dim=1)  # cosine-like scores
    q = sinkhorn(scores, epsilon=0.05, iterations=50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12, dtype=q.dtype))
    torch.testing.assert_close(q.sum(dim=0), torch.full((4,), 3.0, dtype=q.dtype), rtol=0, atol=1e-2)
    gaps = [float(sinkhorn(scores, 0.05, it).sum(dim=0).sub(3).abs().max()) for it in (3, 10, 50)]
    assert gaps[0] > gaps[1] > gaps[2]  # B / K per prototype is approached as iterations grow


def test_sinkhorn_computes_in_float32_without_gradient():
    scores = torch.randn(6, 3, requires_grad=True)
    q = sinkhorn(scores.bfloat16())
    assert q.dtype == torch.float32 and not q.requires_grad


@pytest.mark.parametrize("n_low", [0, 2])
@pytest.mark.parametrize("use_queue", [False, True])
def test_swav_matches_naive_loop(n_low, use_queue):
    high = [0.5 * randn(5, 4, seed=80 + i) for i in range(2)]
    low = [0.5 * randn(5, 4, seed=90 + v) for v in range(n_low)]
    queue = [0.5 * randn(7, 4, seed=100 + i) for i in range(2)] if use_queue else None
    loss = swav_loss(high, low, temperature=0.2, sinkhorn_iterations=3, epsilon=0.1, queue_scores=queue)
    close(loss, naive_swav(high, low, 0.2, 3, 0.1, queue))


def test_swav_gradient_flows_through_predictions_only():
    high = [randn(5, 4, seed=110 + i).requires_grad_() for i in range(2)]
    low = [randn(5, 4, seed=120).requires_grad_()]
    swav_loss(high, low).backward()
    assert all(x.grad.abs().sum() > 0 for x in high + low)


def test_swav_rejects_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="two crops"):
        swav_loss([x], [])
    with pytest.raises(ValueError, match="queue_scores"):
        swav_loss([x, x], [], queue_scores=[x])


def test_batch_losses_reject_bad_shapes():
    one, two = torch.randn(1, 4), torch.randn(4, 3)
    for fn in (barlow_twins_loss, vicreg_terms, vicreg_loss):
        with pytest.raises(ValueError, match="at least 2"):
            fn(one, one)
        with pytest.raises(ValueError, match="same shape"):
            fn(two, torch.randn(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        negative_cosine(two, torch.randn(3, 3))
