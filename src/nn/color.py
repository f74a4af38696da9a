"""CIE Lab colour and the quantised colour targets of Colorful Image Colorization (Zhang et al. 2016).

Pure torch, no Lightning: every function runs on its input's device. The colour conversions always run in
float32 (float64 inputs stay float64) with autocast disabled, so they are exact enough under bf16/AMP.

- ``rgb_to_lab`` / ``lab_to_rgb``: sRGB in [0, 1] <-> CIE Lab under D65 (L in [0, 100]).
- ``ab_gamut_bins``: the centres of the 10 x 10 ab bins that sRGB colours reach (Zhang's Q bins).
- ``soft_encode``: Gaussian soft targets on the k nearest bins (Zhang Sec. 2.1).
- ``smooth_prior`` / ``rebalance_weights``: class rebalancing from the smoothed empirical prior (Zhang Eq. 3-4).
- ``annealed_mean``: the decoding of a bin distribution to ab (Zhang Eq. 5).
- ``l_bins`` / ``l_encode``: uniform lightness bins for split-brain's ab -> L classification (Zhang et al. 2017).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# sRGB (linear) -> CIE XYZ, D65 (IEC 61966-2-1)
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))  # fmt: skip
WHITE_D65 = (0.95047, 1.0, 1.08883)
DELTA = 6 / 29
AB_STEP, AB_RANGE = 10.0, 110.0  # Zhang et al. 2016: grid size 10 over ab in [-110, 110]


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _matrix(rows, like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE Lab (B, 3, H, W), D65 white, L in [0, 100].

    Companding: linear = c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ^ 2.4; XYZ = M linear;
    f(t) = t^(1/3) if t > delta^3 else t / (3 delta^2) + 4/29 with delta = 6/29;
    L = 116 f(Y/Yn) - 16, a = 500 (f(X/Xn) - f(Y/Yn)), b = 200 (f(Y/Yn) - f(Z/Zn))."""
    with torch.autocast(rgb.device.type, enabled=False):
        c = _float(rgb)
        lin = torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
        xyz = torch.einsum("ij,bjhw->bihw", _matrix(RGB_TO_XYZ, c), lin)
        t = xyz / _matrix(WHITE_D65, c).view(1, 3, 1, 1)
        f = torch.where(t > DELTA**3, t.clamp_min(DELTA**3) ** (1 / 3), t / (3 * DELTA**2) + 4 / 29)
        fx, fy, fz = f.unbind(1)
        return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIE Lab (B, 3, H, W) -> sRGB (B, 3, H, W) clamped to [0, 1]: the inverse of :func:`rgb_to_lab`."""
    with torch.autocast(lab.device.type, enabled=False):
        lab = _float(lab)
        L, a, b = lab.unbind(1)
        fy = (L + 16) / 116
        f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
        t = torch.where(f > DELTA, f**3, 3 * DELTA**2 * (f - 4 / 29))
        xyz = t * _matrix(WHITE_D65, lab).view(1, 3, 1, 1)
        lin = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_matrix(RGB_TO_XYZ, lab)), xyz).clamp(0, 1)
        rgb = torch.where(lin <= 0.04045 / 12.92, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)
        return rgb.clamp(0, 1)


@functools.lru_cache(maxsize=4)
def _gamut_bins(levels: int) -> Tensor:
    v = torch.linspace(0, 1, levels, dtype=torch.float64)
    square = torch.cartesian_prod(v, v)  # levels^2 x 2
    faces = []
    for c in range(3):  # the 6 faces of the RGB cube: channel c fixed at 0 or 1
        for value in (0.0, 1.0):
            cols = list(square.unbind(1))
            cols.insert(c, torch.full_like(cols[0], value))
            faces.append(torch.stack(cols))
    rgb = torch.cat(faces, dim=1).view(1, 3, -1, 1)
    ab = rgb_to_lab(rgb)[0, 1:, :, 0]  # 2 x N
    n = round(2 * AB_RANGE / AB_STEP) + 1  # 23 centres per axis: -110, -100, ..., 110
    idx = ((ab + AB_RANGE) / AB_STEP).round().long().clamp(0, n - 1)
    hit = torch.zeros(n * n, dtype=torch.bool)
    hit[idx[0] * n + idx[1]] = True
    grid = torch.arange(n, dtype=torch.float64) * AB_STEP - AB_RANGE
    return torch.cartesian_prod(grid, grid)[hit].float()  # Q x 2, (a, b) in row-major order


def ab_gamut_bins(levels: int = 512) -> Tensor:
    """Centres (Q x 2, float32, CPU) of the 10 x 10 ab bins over [-110, 110]^2 that sRGB colours reach.

    Found deterministically: the ab of every colour lies inside the ab outline of the gamut's surface (the
    image of the RGB cube's faces), so the 6 faces are sampled on a ``levels`` x ``levels`` grid, converted
    to Lab in float64, and each ab is rounded to its nearest centre; the bins hit at any lightness are kept
    (cached). This gives Q = 262 bins, the same at 512, 1024 and 2048 levels (the bin (20, -80) is only
    grazed, and coarser grids can miss it); Zhang et al. report 313 in-gamut bins."""
    return _gamut_bins(levels).clone()


def soft_encode(ab: Tensor, centres: Tensor, k: int = 5, sigma: float = 5.0) -> Tensor:
    """Soft-encoded targets (B, Q, H, W) of ``ab`` (B, 2, H, W): per pixel, Gaussian weights
    exp(-d^2 / (2 sigma^2)) on the ``k`` nearest of the ``centres`` (Q x 2), normalised to sum to 1."""
    B, _, H, W = ab.shape
    with torch.autocast(ab.device.type, enabled=False):
        pts = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)  # N x 2
        d2 = torch.cdist(pts, centres.float()) ** 2  # N x Q
        near, idx = d2.topk(k, dim=1, largest=False)  # N x k
        w = torch.softmax(-near / (2 * sigma**2), dim=1)  # Gaussian weights normalised over the k nearest
        z = torch.zeros_like(d2).scatter_(1, idx, w)  # N x Q
    return z.view(B, H, W, -1).permute(0, 3, 1, 2)  # B x Q x H x W


def smooth_prior(prior: Tensor, centres: Tensor, sigma: float = 5.0) -> Tensor:
    """The empirical ``prior`` (Q,) (counts or probabilities) smoothed with a Gaussian kernel of ``sigma`` ab
    units between the bin ``centres`` (Q x 2), as a distribution p~ (float32). The kernel's rows are
    normalised, so a uniform prior stays uniform; an all-zero prior is taken as uniform."""
    with torch.autocast(prior.device.type, enabled=False):
        p = prior.float()
        p = torch.where(p.sum() > 0, p / p.sum().clamp_min(1e-30), 1 / p.numel())  # no host sync
        c = centres.float().to(p.device)
        kernel = torch.exp(-torch.cdist(c, c) ** 2 / (2 * sigma**2))  # Q x Q
        p = (kernel / kernel.sum(1, keepdim=True)) @ p
        return p / p.sum()


def rebalance_weights(prior: Tensor, centres: Tensor, lam: float = 0.5, sigma: float = 5.0) -> Tensor:
    """Class-rebalancing weights (Q,) of Zhang et al. 2016 (Eq. 3-4) from an empirical ``prior`` (Q,) over
    the bins at ``centres`` (Q x 2): with p~ = :func:`smooth_prior`, w = ((1 - lam) p~ + lam / Q)^-1,
    scaled so that E_{p~}[w] = sum_q p~_q w_q = 1 (rarer colours weigh more; a uniform prior gives 1)."""
    p = smooth_prior(prior, centres, sigma)
    w = 1 / ((1 - lam) * p + lam / p.numel())
    return w / (p * w).sum()


def annealed_mean(logits: Tensor, centres: Tensor, T: float = 0.38) -> Tensor:
    """Annealed mean (Zhang et al. 2016, Eq. 5) of bin ``logits`` (B, Q, H, W) over ``centres`` (Q x D):
    sum_q softmax(logits / T)_q centre_q, (B, D, H, W). T = 1 is the mean, T -> 0 the mode."""
    p = torch.softmax(logits.float() / T, dim=1)  # B x Q x H x W
    return torch.einsum("bqhw,qd->bdhw", p, centres.float().to(p.device))


def l_bins(num: int = 100) -> Tensor:
    """Centres (num x 1) of ``num`` equal lightness bins over [0, 100] (split-brain's ab -> L classes)."""
    return ((torch.arange(num, dtype=torch.float32) + 0.5) * (100 / num)).unsqueeze(1)


def l_encode(L: Tensor, num: int = 100) -> Tensor:
    """Index (long, same shape as ``L``) of the lightness bin of :func:`l_bins` holding each value of ``L``."""
    return (L.float() * (num / 100)).floor().long().clamp(0, num - 1)


def area_resize(x: Tensor, size: int) -> Tensor:
    """``x`` (B, C, H, W) resized to size x size by area averaging (the ab targets at the prediction size)."""
    return x if x.shape[-1] == size and x.shape[-2] == size else F.interpolate(x, size=(size, size), mode="area")
