"""Self-distillation pieces of iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer") and
DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"): pure functions of
tensors, no Lightning. DINO's own loss (with its centring inside) is :func:`src.nn.losses.dino_loss`; here the
teacher's targets are computed first (centring or Sinkhorn-Knopp) and the losses take them as probabilities.

- :func:`teacher_softmax`: DINO's centring and sharpening, softmax((t - c) / tau_t);
- :func:`sinkhorn_knopp`: DINOv2's alternative teacher (``centering: sinkhorn_knopp``): 3 Sinkhorn-Knopp
  iterations over the rows of every process (the sums and the row count all-reduced, so a rank may hold any number
  of rows, as the masked patches do);
- :func:`update_center_`: the EMA centre from the mean over the rows of every process;
- :func:`distillation_loss`: the cross-view cross-entropy of DINO's eq. 1 with given teacher probabilities;
- :func:`ibot_patch_loss`: iBOT's masked-patch cross-entropy (its eq. 2), each image normalised by its masked count;
- :func:`koleo_loss`: the Kozachenko-Leonenko entropy regulariser of DINOv2 (Sablayrolles et al. 2019);
- :func:`ibot_masks` / :func:`dinov2_masks`: which global crops are masked, and how much, as each reference draws it
  (the blocks themselves come from BEiT's generator, :func:`src.nn.masks.block_mask`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.nn.losses import sinkhorn
from src.nn.masks import block_mask
from src.utils import distributed as du


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def teacher_softmax(teacher: Tensor, center: Tensor, temp: float) -> Tensor:
    """DINO's teacher targets (Caron et al. 2021, Algorithm 1): softmax((teacher - center) / temp) over the last
    dimension, in (at least) float32. ``center`` broadcasts against ``teacher`` ((1, K) or (1, 1, K))."""
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    return F.softmax((_f32(teacher) - _f32(center).reshape(-1)) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(teacher: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher (``dinov2/loss/dino_clstoken_loss.py`` and ``ibot_patch_loss.py``,
    ``sinkhorn_knopp_teacher``; SwAV's eq. 3 with epsilon = the teacher temperature).

    ``teacher``: (n, K) logits of this process's rows (n may differ between processes: masked patches). With
    Q = exp(teacher / temp)^T (K x N over the N rows of every process), Q is scaled to total mass 1, then
    ``iterations`` times: each prototype's row to mass 1/K (sums all-reduced), each sample's column to 1/N. Returns
    (n, K) targets whose rows sum to 1. The global maximum is subtracted first (it cancels in the normalisation).
    """
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    return sinkhorn(teacher, epsilon=temp, iterations=iterations)  # SwAV's, which counts every process's rows


@torch.no_grad()
def update_center_(center: Tensor, values: Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of ``values`` (n, K) over the rows of every process (sums
    and counts all-reduced; processes may hold different n). Unchanged when no process holds a row. In place, no
    host-device sync."""
    total = du.all_reduce_sum(_f32(values).sum(dim=0))  # K
    count = du.all_reduce_sum(torch.tensor(float(values.shape[0]), device=values.device))
    mean = (total / count.clamp(min=1.0)).reshape(center.shape)
    center.copy_(torch.where(count > 0, center * momentum + mean * (1.0 - momentum), center))


def distillation_loss(student: list[Tensor], teacher: list[Tensor], student_temp: float = 0.1) -> Tensor:
    """Cross-view self-distillation (DINO eq. 1; DINOv2 ``DINOLoss.forward`` over its local and global terms).

    ``student``: one (B, K) logit tensor per view, the global views first; ``teacher``: one (B, K) probability tensor
    per global view (from :func:`teacher_softmax` or :func:`sinkhorn_knopp`). The loss is the mean over the pairs
    (i, v), v != i, of mean_b sum_k -q_ik log softmax(s_v / student_temp)_k, in (at least) float32. DINOv2's division
    of its local and global sums by (n_global x (n_global - 1) + n_global x n_local) is this same mean.
    """
    if student_temp <= 0:
        raise ValueError(f"student temperature must be > 0, got {student_temp}")
    if len(student) < len(teacher):
        raise ValueError(f"distillation_loss: {len(student)} student views for {len(teacher)} teacher views")
    pairs = [(i, v) for i in range(len(teacher)) for v in range(len(student)) if v != i]
    if not pairs:
        raise ValueError("distillation_loss: no (teacher view, other student view) pair")
    log_p = [F.log_softmax(_f32(s) / student_temp, dim=-1) for s in student]
    return sum(-(_f32(teacher[i]).detach() * log_p[v]).sum(dim=-1).mean() for i, v in pairs) / len(pairs)


def ibot_patch_loss(student: Tensor, teacher: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """iBOT's masked image modelling loss (Zhou et al. 2022, eq. 2; ``main_ibot.py`` iBOTLoss and DINOv2's
    ``iBOTPatchLoss.forward_masked``).

    ``masks``: (N, L) bool, the masked patches of N student crops; ``student``: (M, K) logits and ``teacher``: (M, K)
    probabilities of the M = masks.sum() masked patches, in ``masks.nonzero()`` order (image by image, row-major).
    The loss is (1 / N) sum_n (1 / m_n) sum_{masked j of n} sum_k -q_jk log softmax(s_j / student_temp)_k with m_n
    the masked count of image n (at least 1): every crop weighs the same whatever its mask ratio, and crops without
    a mask count in N with 0.
    """
    if student_temp <= 0:
        raise ValueError(f"student temperature must be > 0, got {student_temp}")
    if teacher.shape != student.shape:
        raise ValueError(f"ibot_patch_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    weight = (1.0 / masks.sum(dim=-1).clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks]  # M
    ce = -(_f32(teacher).detach() * F.log_softmax(_f32(student) / student_temp, dim=-1)).sum(dim=-1)  # M
    return (ce * weight).sum() / masks.shape[0]


def koleo_loss(x: Tensor, eps: float = 1e-8, gather: bool = False) -> Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2 ``KoLeoLoss``):
    -(1/n) sum_i log(||x_i - x_nn(i)|| + eps) on L2-normalised rows, nn(i) the nearest other row (largest inner
    product), in float32 with autocast off. ``gather``: the rows of every process take part (gradients flow back to
    each process's own rows), so the loss is that of one process holding the whole batch."""
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows to find neighbours, got {x.shape[0]}")
    x = du.gather_with_grad(x) if gather else x
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.T
            dots.fill_diagonal_(-1.0)  # never one's own neighbour
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


# ---- which crops are masked ------------------------------------------------------------------------------
def _rng() -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**62, ())))  # seeded from torch's global RNG


def _blocks(counts: list[int], grid: tuple[int, int], min_block: int, min_aspect: float,
            rng: np.random.Generator, device) -> Tensor:
    h, w = grid
    rows = [block_mask(grid, c, min_block, min_aspect, rng).reshape(-1) if c > 0 else np.zeros(h * w, dtype=bool)
            for c in counts]
    return torch.from_numpy(np.stack(rows)).to(device)


def ibot_masks(n: int, grid: tuple[int, int], probability: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5),
               min_aspect: float = 0.3, device=None) -> Tensor:
    """(n, h * w) bool block masks of n crops as iBOT draws them (``loader.py`` ImageFolderMask with the ViT-S recipe
    ``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``): each crop on its own is masked with ``probability``, with a ratio
    r ~ U(ratio), floor(r h w) patches in blocks of at least (min(h, w) // 3)^2 patches, aspect ratio in
    [min_aspect, 1 / min_aspect]. Randomness from torch's global RNG."""
    rng, size = _rng(), grid[0] * grid[1]
    counts = [int(rng.uniform(*ratio) * size) if rng.random() < probability else 0 for _ in range(n)]
    return _blocks(counts, grid, max(1, (min(grid) // 3) ** 2), min_aspect, rng, device)


def dinov2_masks(n: int, grid: tuple[int, int], probability: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5),
                 min_block: int = 4, min_aspect: float = 0.3, device=None) -> Tensor:
    """(n, h * w) bool block masks of n crops as DINOv2's collate draws them (``dinov2/data/collate.py``,
    ``masking.py``): exactly floor(n x ``probability``) crops are masked, the i-th of them with a ratio drawn
    uniformly from the i-th of the equal slices of ``ratio`` (stratified), floor(r h w) patches in blocks of at least
    ``min_block`` patches; the masks are then shuffled over the n crops. Randomness from torch's global RNG."""
    rng, size = _rng(), grid[0] * grid[1]
    masked = int(n * probability)
    edges = np.linspace(ratio[0], ratio[1], masked + 1)
    counts = [int(size * rng.uniform(edges[i], edges[i + 1])) for i in range(masked)] + [0] * (n - masked)
    order = rng.permutation(n)
    return _blocks([counts[i] for i in order], grid, min_block, min_aspect, rng, device)


def mask_ratio_range_problems(key: str, ratio, probability, probability_key: str) -> list[str]:
    """One line per impossible masking setting (a ratio range within [0, 1), a probability within [0, 1])."""
    problems = []
    ratio = list(ratio) if hasattr(ratio, "__len__") and not isinstance(ratio, str) else ratio  # a ListConfig too
    ok = (isinstance(ratio, list) and len(ratio) == 2 and all(isinstance(r, int | float) for r in ratio)
          and 0 <= ratio[0] <= ratio[1] < 1)
    if not ok:
        problems.append(f"{key}={ratio} must be [low, high] with "
                        "0 <= low <= high < 1 (the share of a crop's patches masked, e.g. [0.1, 0.5])")
    if not isinstance(probability, int | float) or isinstance(probability, bool) or not 0 <= probability <= 1:
        problems.append(f"{probability_key}={probability} must be in [0, 1] (the share of global crops masked, "
                        "e.g. 0.5)")
    return problems

