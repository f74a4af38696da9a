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
    no_self = torch.full((), float("-inf"), dtype=logits.dtype, device=z.device)  # no host copy per step
    logits.index_put_((torch.arange(2 * n, device=z.device), self_idx), no_self)
    return F.cross_entropy(logits, pos_idx)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    queue: torch.Tensor | None = None,
    temperature: float = 0.2,
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE of MoCo (He et al. 2020, eq. 1): one positive key per query against K queued negatives.

    ``query``, ``key``: (N, D); ``queue``: (K, D) negatives or None, in which case the other keys of
    the batch are the negatives (N-way classification, MoCo v3 style). Inputs are L2-normalised here;
    the key is used as given (callers detach it). Mean over the N queries. With ``gather=True`` (no
    queue) the keys of all processes are the candidates and the labels are offset by rank, as in
    MoCo v3's contrastive loss (Chen et al. 2021, Algorithm 1); at world size 1 nothing changes.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if gather and queue is not None:
        raise ValueError("info_nce: gather=True takes its negatives from the batch, not from a queue")
    n = query.shape[0]
    q = F.normalize(query, dim=1)
    k = F.normalize(key, dim=1)
    if queue is None:
        k_all = du.gather_with_grad(k) if gather else k  # M x D, M = world * N
        logits = torch.einsum("nc,mc->nm", q, k_all)  # N x M, positive of query i in column offset + i
        offset = du.rank() * n if gather else 0
        labels = torch.arange(n, device=q.device) + offset
    else:
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # N x 1
        l_neg = torch.einsum("nc,kc->nk", q, F.normalize(queue, dim=1))  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1)  # N x (1 + K), positive in column 0
        labels = q.new_zeros(n, dtype=torch.long)
    return F.cross_entropy(logits / temperature, labels)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity of SimSiam (Chen & He 2021, eq. 1) and BYOL (Grill et al. 2020, eq. 2).

    ``p``, ``z``: (N, D) prediction and target; mean over rows of -cos(p_i, z_i), in [-1, 1]. ``z`` is
    not detached here (the method applies the stop-gradient), so gradients reach both inputs.
    """
    _check_pair(p, z, "negative_cosine")
    return -torch.einsum("nd,nd->n", F.normalize(p, dim=1), F.normalize(z, dim=1)).mean()


def _global_pair(z1: torch.Tensor, z2: torch.Tensor, gather: bool, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked (N, D) pair, gathered with gradient over processes when ``gather``; N >= 2 after gathering."""
    _check_pair(z1, z2, name)
    if gather:
        z1, z2 = du.gather_with_grad(z1), du.gather_with_grad(z2)
    if z1.shape[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2, got {z1.shape[0]}")
    return z1, z2


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5, gather: bool = False
) -> torch.Tensor:
    """Barlow Twins redundancy reduction (Zbontar et al. 2021, eq. 1).

    ``z1``, ``z2``: (N, D) projections of two views, each dimension standardised over the batch as by
    BatchNorm1d(affine=False) in training. With C = z1n^T z2n / N the (D, D) cross-correlation,
        L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.
    With ``gather=True`` both are gathered (with gradient) first, so every rank computes the loss of
    the global batch.
    """
    z1, z2 = _global_pair(z1, z2, gather, "barlow_twins_loss")
    n = z1.shape[0]
    c = torch.einsum("ni,nj->ij", _standardise(z1, eps), _standardise(z2, eps)) / n  # D x D
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    return on_diag + lambd * _off_diagonal(c).pow(2).sum()


def vicreg_terms(
    z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4, gather: bool = False
) -> dict[str, torch.Tensor]:
    """The three VICReg terms (Bardes et al. 2022, eqs. 1-5) as scalar tensors.

    ``z1``, ``z2``: (N, D) embeddings of two views.
      invariance: mean squared distance, mean over N x D (eq. 5);
      variance: mean_j relu(1 - sqrt(Var(z_j) + eps)), unbiased variance, averaged over the two
        branches (eq. 1);
      covariance: sum_{i != j} C(z)_ij^2 / D with C(z) the (D, D) unbiased covariance, summed over
        the two branches (eqs. 3-4).
    With ``gather=True`` both are gathered (with gradient) first, so the terms are those of the
    global batch on every rank.
    """
    z1, z2 = _global_pair(z1, z2, gather, "vicreg")
    return {
        "invariance": F.mse_loss(z1, z2),
        "variance": (_variance_term(z1, eps) + _variance_term(z2, eps)) / 2,
        "covariance": _covariance_term(z1) + _covariance_term(z2),
    }


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
    gather: bool = False,
    return_terms: bool = False,
):
    """VICReg (Bardes et al. 2022, eq. 6): weighted sum of the terms of :func:`vicreg_terms`;
    ``return_terms=True`` returns ``(loss, terms)`` (the unweighted terms, for logging)."""
    t = vicreg_terms(z1, z2, eps=eps, gather=gather)
    loss = sim_weight * t["invariance"] + var_weight * t["variance"] + cov_weight * t["covariance"]
    return (loss, t) if return_terms else loss


def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """DINO self-distillation cross-entropy (Caron et al. 2021, eq. 1 and Algorithm 1).

    ``student_out``: one (B, K) logit tensor per view, the global views first, in the order of
    ``teacher_out``: one (B, K) logit tensor per global view. ``center``: (K,) or (1, K). With
        q_i = softmax((t_i - center) / teacher_temp)   (no gradient),
    the loss is the mean over pairs (i, v), v != i, of mean_b sum_k -q_ik log softmax(s_v / student_temp)_k.
    Computed in (at least) float32.
    """
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got {student_temp} and {teacher_temp}")
    if len(student_out) < len(teacher_out):
        raise ValueError(
            f"dino_loss: {len(student_out)} student views for {len(teacher_out)} teacher views; "
            "the student must see every global view"
        )
    pairs = [(i, v) for i in range(len(teacher_out)) for v in range(len(student_out)) if v != i]
    if not pairs:
        raise ValueError("dino_loss: no (teacher view, other student view) pair")
    center = _at_least_f32(center.detach())
    q = [F.softmax((_at_least_f32(t.detach()) - center) / teacher_temp, dim=-1) for t in teacher_out]
    log_p = [F.log_softmax(_at_least_f32(s) / student_temp, dim=-1) for s in student_out]
    return sum(_soft_cross_entropy(q[i], log_p[v]) for i, v in pairs) / len(pairs)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp codes of SwAV (Caron et al. 2020, eq. 3 and appendix A.1), over the global batch.

    ``scores``: (B, K) prototype scores of this rank (ranks may hold different B: DINOv2's masked patches). Returns
    (B, K) assignments Q* = Diag(u) exp(scores / epsilon) Diag(v) rescaled so that each row is a distribution over
    the K prototypes and, at convergence, the prototypes are equipartitioned over the N rows of every rank (sums and
    N all-reduced). No gradient; computed in (at least) float32. Also DINOv2's teacher
    (:func:`src.nn.self_distillation.sinkhorn_knopp`, epsilon = the teacher temperature).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn needs at least one iteration, got {iterations}")
    s = _at_least_f32(scores)
    k = s.shape[1]
    count = du.all_reduce_sum(s.new_full((1,), float(s.shape[0])))  # N: the rows of every rank (no host copy)
    top = s.amax() if s.numel() else s.new_full((), -torch.inf)
    q = torch.exp((s - du.all_reduce_max(top)) / epsilon).T  # K x B, global max for stability
    q /= du.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= du.all_reduce_sum(q.sum(dim=1, keepdim=True))  # K x 1: each prototype gets total mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # 1 x B: each sample gets total mass 1/N
        q /= count
    return (q * count).T  # B x K, rows sum to 1


def swav_loss(
    scores_high: list[torch.Tensor],
    scores_low: list[torch.Tensor],
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    epsilon: float = 0.05,
    queue_scores: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """SwAV swapped prediction with multi-crop (Caron et al. 2020, eqs. 1-2).

    ``scores_high``: one (B, K) prototype-score tensor per high-resolution crop, whose codes are
    computed; ``scores_low``: one (B, K) tensor per low-resolution crop (may be empty);
    ``queue_scores``: None or one (Q, K) tensor per high-resolution crop, the scores of queued
    embeddings of that crop, prepended for Sinkhorn only. With q_i the codes of high crop i, the loss
    is the mean over pairs (i, v), v any other crop, of mean_b sum_k -q_ik log softmax(s_v / t)_k.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    crops = list(scores_high) + list(scores_low)
    if not scores_high or len(crops) < 2:
        raise ValueError(
            f"swav_loss needs at least one high-resolution crop and two crops in all, got "
            f"{len(scores_high)} high and {len(scores_low)} low"
        )
    if queue_scores is not None and len(queue_scores) != len(scores_high):
        raise ValueError(f"queue_scores has {len(queue_scores)} entries for {len(scores_high)} high crops")
    log_p = [F.log_softmax(_at_least_f32(s) / temperature, dim=1) for s in crops]
    losses = []
    for i, s in enumerate(scores_high):
        b = s.shape[0]
        s = s.detach()
        if queue_scores is not None:
            s = torch.cat([queue_scores[i].detach().to(s.dtype), s])  # (Q + B) x K
        q = sinkhorn(s, epsilon=epsilon, iterations=sinkhorn_iterations)[-b:]  # B x K codes
        losses += [_soft_cross_entropy(q, lp) for v, lp in enumerate(log_p) if v != i]
    return torch.stack(losses).mean()


def _soft_cross_entropy(q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """mean_b sum_k -q_bk log_p_bk; element-wise (not einsum) so that autocast keeps it in float32."""
    return -(q * log_p).sum(dim=1).mean()


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        shapes = f"{list(a.shape)} and {list(b.shape)}"
        raise ValueError(f"{name} expects two (N, D) tensors of the same shape, got {shapes}")


def _standardise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension (z - mean) / sqrt(biased var + eps) over the batch, as BatchNorm1d in training."""
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, correction=0) + eps)  # N x D


def _off_diagonal(c: torch.Tensor) -> torch.Tensor:
    """The D * (D - 1) off-diagonal entries of a (D, D) matrix, flattened."""
    return c[~torch.eye(c.shape[0], dtype=torch.bool, device=c.device)]


def _variance_term(z: torch.Tensor, eps: float) -> torch.Tensor:
    std = torch.sqrt(z.var(dim=0) + eps)  # D, unbiased
    return F.relu(1 - std).mean()


def _covariance_term(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(dim=0)  # N x D
    cov = torch.einsum("ni,nj->ij", zc, zc) / (z.shape[0] - 1)  # D x D
    return _off_diagonal(cov).pow(2).sum() / z.shape[1]


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = False,
              local: bool = True) -> torch.Tensor:
    """The symmetric InfoNCE of CLIP (Radford et al. 2021, Figure 3's pseudocode).

    ``image``, ``text``: (N, D) embeddings of N pairs (L2-normalised here); ``logit_scale``: the learned
    log of the inverse temperature. Logits ``exp(logit_scale) * <i, t>``; the loss is the mean of the
    cross-entropy of each image over the texts and of each text over the images, the pair being the positive.
    With ``gather=True`` the candidates are the embeddings of all processes: ``local=True`` keeps the anchors
    local (N x world*N logits, labels offset by rank; the mean over ranks is the global loss), ``local=False``
    computes the whole global matrix on every rank (the same loss and gradients, world times the arithmetic).
    """
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    scale = logit_scale.exp()
    if gather and not local:
        image, text = du.gather_with_grad(image), du.gather_with_grad(text)
        gather = False
    image_all = du.gather_with_grad(image) if gather else image
    text_all = du.gather_with_grad(text) if gather else text
    labels = torch.arange(image.shape[0], device=image.device) + (du.rank() * image.shape[0] if gather else 0)
    per_image = scale * torch.einsum("nd,md->nm", image, text_all)  # N x M: each image against every text
    per_text = scale * torch.einsum("nd,md->nm", text, image_all)  # N x M: each text against every image
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
