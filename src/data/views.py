"""Batched SSL augmentations with independent random parameters per sample.

Every function takes float images in [0, 1] of shape (B, C, H, W), C in {1, 3}, and runs on the
images' device without a Python loop over samples. Randomness comes from torch's global RNG on that
device, so ``torch.manual_seed`` makes the views reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601
DEFAULTS = dict(
    num=1, size=None, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip_p=0.5, vflip_p=0.0, rot90_p=0.0, jitter_p=0.8,
    brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, gray_p=0.2, blur_p=0.0, blur_sigma=(0.1, 2.0),
    blur_kernel_frac=0.1, solarize_p=0.0, solarize_threshold=0.5, random_jitter_order=1.0, gray_before_jitter=0.0,
)  # fmt: skip


def _uniform(lo: float, hi: float, n: int, device: torch.device) -> Tensor:
    """(n,) float32 samples uniform in [lo, hi]."""
    return lo + (hi - lo) * torch.rand(n, device=device)


def _where_p(x: Tensor, p: float, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Replace each sample of ``x`` (B, C, H, W) by ``fn(x)`` with probability ``p``, independently."""
    if p <= 0:
        return x
    y = fn(x)
    if p >= 1:
        return y
    mask = torch.rand(x.shape[0], device=x.device) < p
    return torch.where(mask.view(-1, 1, 1, 1), y, x)


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               device: torch.device | str = "cpu", tries: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` random resized crop boxes (x0, y0, w, h), each (n,) float32 in pixels, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one: up to ``tries`` times an area fraction ~ U(scale) and an aspect
    ratio w/h log-uniform in ``ratio``, the first box that fits in the image is kept; when none fits, the central
    crop (the whole image, or its largest central box with the nearest allowed ratio). The box is placed uniformly
    inside the image. All tries are drawn at once; sizes and positions stay continuous (torchvision rounds them to
    whole pixels)."""
    area = _uniform(scale[0], scale[1], n * tries, device).view(n, tries) * (height * width)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), n * tries, device)).view(n, tries)
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)  # n x tries
    first = fits.int().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    in_ratio = width / height  # no box fits: torchvision's central crop
    if in_ratio < ratio[0]:
        cw, ch = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        cw, ch = height * ratio[1], float(height)
    else:
        cw, ch = float(width), float(height)
    w, h = torch.where(found, w, cw), torch.where(found, h, ch)
    x0 = torch.where(found, torch.rand(n, device=device) * (width - w), (width - w) / 2)
    y0 = torch.where(found, torch.rand(n, device=device) * (height - h), (height - h) / 2)
    return x0, y0, w, h


def random_resized_crop_flip(
    x: Tensor, size: int, scale: tuple[float, float], ratio: tuple[float, float], flip_p: float,
    vflip_p: float = 0.0, rot90_p: float = 0.0,
) -> Tensor:
    """Per-sample random resized crop + horizontal flip (+ vertical flip, + rotation by 90, 180 or 270 degrees)
    as one affine grid. (B, C, H, W) -> (B, C, size, size).

    The box is torchvision's ``RandomResizedCrop.get_params`` drawn for every sample at once (:func:`crop_boxes`):
    area fraction ~ U(scale), aspect ratio w/h log-uniform in ``ratio``, up to 10 tries for a box that fits, else
    the central crop; it is placed uniformly inside the image. Bilinear, align_corners=False.
    ``vflip_p``: probability of a vertical flip; ``rot90_p``: probability of a rotation by k x 90 degrees, k
    uniform in {1, 2, 3} (rot90_p = 0.75 makes all four orientations equally likely). The square output grid
    maps onto itself under these, so a full-image view is an exact flip or rotation. Without them
    (probability 0) no random number is drawn for them: the views of other recipes are unchanged.
    """
    B, C, H, W = x.shape
    dev = x.device
    x0, y0, w, h = crop_boxes(B, H, W, scale, ratio, dev)
    flip = torch.where(torch.rand(B, device=dev) < flip_p, -1.0, 1.0)
    vflip = torch.where(torch.rand(B, device=dev) < vflip_p, -1.0, 1.0) if vflip_p > 0 else torch.ones(B, device=dev)
    k = torch.zeros(B, dtype=torch.long, device=dev)
    if rot90_p > 0:
        k = torch.where(torch.rand(B, device=dev) < rot90_p, torch.randint(1, 4, (B,), device=dev), k)
    # exact cos / sin of k x 90 degrees (1, 0, -1, 0 and 0, 1, 0, -1), from k alone: no table copied to the device
    cos = ((1 - k % 2) * (1 - k)).float()
    sin = ((k % 2) * (2 - k)).float()
    sx, sy = w / W * flip, h / H * vflip
    theta = torch.zeros(B, 2, 3, device=dev)  # input = diag(sx, sy) @ rotation(k) @ output + centre
    theta[:, 0, 0], theta[:, 0, 1] = sx * cos, -sx * sin
    theta[:, 1, 0], theta[:, 1, 1] = sy * sin, sy * cos
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma of (B, 3, H, W) images as (B, 1, H, W); (B, 1, H, W) is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def random_grayscale(x: Tensor, p: float) -> Tensor:
    """With probability ``p`` per sample, replace RGB by its luma on all 3 channels. C == 1: no-op."""
    if x.shape[1] == 1:
        return x
    return _where_p(x, p, lambda t: grayscale(t).repeat(1, 3, 1, 1))


def shift_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Shift the HSV hue of RGB images (B, 3, H, W) by ``hue`` (B,) turns; S and V are kept.

    Closed form of RGB -> HSV -> (h + hue) -> RGB: with v = max, delta = max - min and h in sixths of a
    turn, channel n in (R, G, B) = (5, 3, 1) is v - delta * clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    """
    maxc, arg = x.max(1, keepdim=True)
    delta = maxc - x.amin(1, keepdim=True)
    diff = x.roll(-1, 1) - x.roll(-2, 1)  # (g - b, b - r, r - g)
    h6 = diff.gather(1, arg) / delta.clamp_min(1e-12) + 2 * arg  # hue in [-1, 5] sixths; any value if delta=0
    n = torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = (n + h6 + 6 * hue.view(-1, 1, 1, 1)) % 6
    return maxc - delta * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(
    x: Tensor,
    brightness: Tensor | None = None,
    contrast: Tensor | None = None,
    saturation: Tensor | None = None,
    hue: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """Colour jitter with per-sample (B,) parameters: brightness, contrast, saturation and hue in the order of each
    sample's row of ``order`` (B, 4), a permutation of 0-3 naming them in that sequence (torchvision's ColorJitter
    draws one per image), or in that fixed order when ``order`` is None.

    brightness / contrast / saturation are multiplicative factors (1 = identity); contrast blends with
    the per-image mean of the luma, saturation with the per-pixel luma; hue is a shift in turns
    (0 = identity) in HSV space (see ``shift_hue``). ``None`` skips that op. Results are clamped to
    [0, 1] after each op (as torchvision does). For C == 1, saturation and hue are skipped.

    Batched without a loop over samples: the three blends are one blend whose target (0, the mean luma or the
    luma) and factor are chosen per sample, run at each position where some sample may need one before its hue
    shift and again after it; the hue shift, the costly op, runs once for all samples.
    """
    B, dev = x.shape[0], x.device
    rgb = x.shape[1] == 3
    ones = torch.ones(B, device=dev)
    factors = torch.stack([f if f is not None else ones for f in (brightness, contrast, saturation)]
                          + [ones], dim=1)  # B x 4, the hue column unused
    on = [i for i, f in enumerate((brightness, contrast, saturation if rgb else None)) if f is not None]

    def active(op: Tensor) -> Tensor:  # whether each sample's op at this position is one of the jitters in use
        return functools.reduce(torch.logical_or, [op == i for i in on], torch.zeros_like(op, dtype=torch.bool))

    if order is None:
        order = torch.arange(4, device=dev).expand(B, 4)
    hue_at = (order == 3).int().argmax(dim=1)  # B: the position of the hue shift

    def blend_step(x: Tensor, op: Tensor, when: Tensor) -> Tensor:
        luma = grayscale(x)  # B x 1 x H x W
        target = torch.where((op == 2).view(-1, 1, 1, 1), luma,
                             torch.where((op == 1).view(-1, 1, 1, 1), luma.mean((1, 2, 3), keepdim=True), 0.0))
        f = factors.gather(1, op.view(-1, 1)).view(-1, 1, 1, 1)
        y = (target + f * (x - target)).clamp(0, 1)
        return torch.where((when & active(op)).view(-1, 1, 1, 1), y, x)

    for t in range(3):  # the blends a sample makes before its hue shift
        x = blend_step(x, order[:, t], t < hue_at)
    if hue is not None and rgb:
        x = shift_hue(x, hue).clamp(0, 1)
    for t in range(1, 4):  # and after it
        x = blend_step(x, order[:, t], t > hue_at)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor | float, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with per-sample ``sigma`` (B,) (or a float), odd ``kernel_size``, reflect padding.

    All samples are blurred at once by a grouped convolution with one kernel per (sample, channel).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size={kernel_size} must be a positive odd integer")
    B, C, H, W = x.shape
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(B)
    r = kernel_size // 2
    t = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - r
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K)
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(B * C, 1, 1, kernel_size), groups=B * C)
    y = F.conv2d(y, k.view(B * C, 1, kernel_size, 1), groups=B * C)
    return y.view(B, C, H, W)


def solarize(x: Tensor, threshold: float) -> Tensor:
    """Invert pixels >= ``threshold`` (x -> 1 - x), on the [0, 1] scale."""
    return torch.where(x >= threshold, 1 - x, x)


def normalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-channel (x - mean) / std; ``mean``, ``std``: (C,)."""
    return (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(x.device).view(1, -1, 1, 1)


def _to_float(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]; floating inputs are taken as already in [0, 1]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"views: expected images of shape (B, C, H, W) with C in {{1, 3}}, got {tuple(images.shape)}"
        )
    if images.dtype == torch.uint8:
        return images.float() / 255
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"views: expected uint8 or float images, got {images.dtype}")


def parse_crop_group(i: int, group) -> dict:
    """Fill defaults, convert to plain Python types and check ranges of one crop group."""
    g = dict(group)
    name = f"views.crops[{i}]"
    for key in g:
        if key not in DEFAULTS:
            raise ValueError(f"{name}: unknown key '{key}'; allowed: {', '.join(DEFAULTS)}")
    if "size" not in g:
        raise ValueError(f"{name}: missing required key 'size' (output side in pixels, int > 0)")
    g = {**DEFAULTS, **g}
    for key, value in g.items():
        pair, integer = key in ("scale", "ratio", "blur_sigma"), key in ("num", "size")
        try:
            g[key] = tuple(float(v) for v in value) if pair else int(value) if integer else float(value)
        except (TypeError, ValueError):
            g[key] = None
        if g[key] is None or (pair and len(g[key]) != 2) or (integer and g[key] != value):
            kind = "a pair [min, max] of numbers" if pair else "an integer" if integer else "a number"
            raise ValueError(f"{name}.{key}={value!r}: must be {kind}")

    def check(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise ValueError(f"{name}.{key}={g[key]!r}: must be {allowed}")

    check(g["num"] >= 1, "num", ">= 1")
    check(g["size"] > 0, "size", "> 0")
    for key in ("flip_p", "vflip_p", "rot90_p", "jitter_p", "gray_p", "blur_p", "solarize_p", "solarize_threshold"):
        check(0 <= g[key] <= 1, key, "in [0, 1]")
    for key in ("random_jitter_order", "gray_before_jitter"):
        check(g[key] in (0.0, 1.0), key, "0 or 1")
    check(0 < g["scale"][0] <= g["scale"][1] <= 1, "scale", "[min, max] with 0 < min <= max <= 1")
    check(0 < g["ratio"][0] <= g["ratio"][1], "ratio", "[min, max] with 0 < min <= max")
    check(0 < g["blur_sigma"][0] <= g["blur_sigma"][1], "blur_sigma", "[min, max] with 0 < min <= max")
    check(0 < g["blur_kernel_frac"] <= 1, "blur_kernel_frac", "in (0, 1]")
    check(0 <= g["hue"] <= 0.5, "hue", "in [0, 0.5]")
    for key in ("brightness", "contrast", "saturation"):
        check(g[key] >= 0, key, ">= 0")
    k = max(3, round(g["blur_kernel_frac"] * g["size"]))
    g["kernel_size"] = min(k + 1 - k % 2, 2 * g["size"] - 1)  # reflect padding needs pad < size
    return g


def local_group(sizes: list) -> int | None:
    """The index of the local crop group of a multi-crop recipe given its groups' sizes: the one group smaller than
    the first; None when there is no such group. ValueError when there are several."""
    local = [i for i, size in enumerate(sizes) if isinstance(size, int) and isinstance(sizes[0], int) and size < sizes[0]]
    if len(local) > 1:
        raise ValueError(f"views.local_crops: views.crops {local} are all smaller than the first group; "
                         "set each group's num instead of views.local_crops")
    return local[0] if local else None


def with_local_crops(groups: list[dict], local_crops: int | None) -> list[dict]:
    """``groups`` (parsed) with the local group's ``num`` set to ``local_crops`` (dropped at 0); as given at None."""
    if local_crops is None:
        return groups
    if not isinstance(local_crops, int) or isinstance(local_crops, bool) or local_crops < 0:
        raise ValueError(f"views.local_crops={local_crops!r}: must be an integer >= 0 (or null: each group's own num)")
    i = local_group([g["size"] for g in groups])
    if i is None:
        raise ValueError(f"views.local_crops={local_crops}: these views have no local crops (no crop group smaller "
                         "than the first); set views.local_crops=null")
    if groups[i].get("num", 1) != 1:  # a num set on the group itself: which one is meant is not ours to guess
        raise ValueError(f"views.crops.{i}.num={groups[i]['num']} and views.local_crops={local_crops}: the local "
                         f"crops' count is views.local_crops; set views.local_crops={groups[i]['num']} instead")
    groups = [dict(g) for g in groups]
    groups[i]["num"] = local_crops
    return [g for g in groups if g.get("num", 1) > 0]


class Views(torch.nn.Module):
    """Random SSL views of a uint8 batch, with independent random parameters per sample.

    ``crops`` is a list of groups (dicts, or OmegaConf configs); group j yields ``num`` views of shape
    (B, C, size, size) and the output list holds the views of group 0 first, then group 1, ... Per view:
    random resized crop + flips + 90-degree rotations (one affine grid), colour jitter (p=jitter_p; brightness, contrast,
    saturation and hue in a random order per sample as torchvision's ColorJitter, or ``random_jitter_order: 0`` in that
    fixed order; hue shifted in HSV), random grayscale (ITU-R 601 luma, keeps 3 channels; before the jitter with
    ``gray_before_jitter: 1``, MoCo v1's order), Gaussian blur, solarisation, clamp to [0, 1], normalisation with
    ``mean`` / ``std``.

    Grayscale images (C == 1): brightness and contrast apply; saturation, hue and random grayscale are
    skipped. Outputs are float32; computation runs on the images' device under ``torch.no_grad()``.

    ``local_crops``: how many local crops a multi-crop recipe makes (DINO's ``--local_crops_number``): the ``num``
    of its one crop group smaller than the first group, which sets none itself (0 drops the group); None keeps
    every group's own ``num``.
    """

    def __init__(self, crops: list[dict], mean: list[float], std: list[float], eval_size: int | None = None,
                 local_crops: int | None = None):
        super().__init__()
        if len(crops) == 0:
            raise ValueError("views.crops=[]: must hold at least one crop group")
        self.groups = with_local_crops([parse_crop_group(i, g) for i, g in enumerate(crops)], local_crops)
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise ValueError(f"views.mean={mean}, views.std={std}: must have the same length, 1 or 3")
        if min(std) <= 0:
            raise ValueError(f"views.std={std}: all entries must be > 0")
        if eval_size is not None and int(eval_size) <= 0:
            raise ValueError(f"views.eval_size={eval_size}: must be > 0 or None")
        self.eval_size = None if eval_size is None else int(eval_size)
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)
        self.num_views = sum(g["num"] for g in self.groups)

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo the normalisation of a view: float images back in [0, 1] (pretext tasks that need colour)."""
        return x * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)

    def _normalize(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.mean.numel():
            raise ValueError(
                f"views: images have {x.shape[1]} channels but mean/std have {self.mean.numel()}"
            )
        return normalize(x, self.mean, self.std)

    def _view(self, x: Tensor, g: dict) -> Tensor:
        """One random view (B, C, size, size) of float images x (B, C, H, W) in [0, 1]."""
        B, dev = x.shape[0], x.device
        x = random_resized_crop_flip(x, g["size"], g["scale"], g["ratio"], g["flip_p"], g["vflip_p"], g["rot90_p"])

        def factor(strength: float, center: float) -> Tensor | None:
            lo = center - strength if center == 0 else max(0.0, center - strength)
            return _uniform(lo, center + strength, B, dev) if strength > 0 else None

        def jitter(t: Tensor) -> Tensor:
            b, c = factor(g["brightness"], 1.0), factor(g["contrast"], 1.0)
            s, h = factor(g["saturation"], 1.0), factor(g["hue"], 0.0)
            order = torch.rand(B, 4, device=dev).argsort(dim=1) if g["random_jitter_order"] else None
            return color_jitter(t, b, c, s, h, order)

        if g["gray_before_jitter"]:  # MoCo v1's order: RandomGrayscale, then ColorJitter
            x = random_grayscale(x, g["gray_p"])
        x = _where_p(x, g["jitter_p"], jitter)
        if not g["gray_before_jitter"]:
            x = random_grayscale(x, g["gray_p"])
        sigma = g["blur_sigma"]
        x = _where_p(x, g["blur_p"], lambda t: gaussian_blur(t, _uniform(*sigma, B, dev), g["kernel_size"]))
        x = _where_p(x, g["solarize_p"], lambda t: solarize(t, g["solarize_threshold"]))
        return self._normalize(x.clamp(0, 1))

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """uint8 (B, C, H, W) -> list of ``num_views`` float32 (B, C, size_j, size_j) views, group order."""
        x = _to_float(images)
        with torch.autocast(x.device.type, enabled=False):  # keep float32 under mixed precision
            return [self._view(x, g) for g in self.groups for _ in range(g["num"])]

    @torch.no_grad()
    def eval_view(self, images: Tensor) -> Tensor:
        """Deterministic view: optional resize of the shorter side to ``eval_size`` + centre crop, normalise."""
        x = _to_float(images)
        s = self.eval_size
        H, W = x.shape[-2:]
        if s is not None and (H, W) != (s, s):
            if min(H, W) != s:
                H, W = (s, int(s * W / H)) if H <= W else (int(s * H / W), s)
                with torch.autocast(x.device.type, enabled=False):
                    x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
            top, left = round((H - s) / 2), round((W - s) / 2)
            x = x[..., top : top + s, left : left + s]
        return self._normalize(x)
