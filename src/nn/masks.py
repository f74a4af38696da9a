"""Masks of the masked-prediction methods, boolean with True = missing (hidden from the encoder, predicted).

- Context Encoders (Pathak et al. 2016), in pixels: the central region, random blocks, and the overlap (the
  hole the encoder sees is the target hole shrunk by ``overlap`` px on every side, and the reconstruction loss
  weighs that visible border of the target ``overlap_weight``, 10 in the paper, times more than the inside).
- MAE (He et al. 2021), in patch tokens: :func:`random_masking` keeps a random subset of the tokens per sample
  by sorting uniform noise (sec. 3, "Masking"; the encoder sees only the kept ones).
- BEiT (Bao et al. 2021), in patch tokens: :func:`block_masks`, the blockwise masking of its Algorithm 1
  (rectangles of random area and aspect ratio until the wanted number of patches is masked).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def center_mask(size: int, frac: float = 0.5) -> Tensor:
    """(size, size) bool mask of a centred square hole of side round(size * frac), top-left corner at
    ((size - side) // 2, (size - side) // 2). Pathak et al.: a 64 x 64 hole in a 128 x 128 image (frac 0.5)."""
    if not 0 < frac < 1:
        raise ValueError(f"center_mask: frac={frac} must be in (0, 1)")
    side = round(size * frac)
    start = (size - side) // 2
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[start : start + side, start : start + side] = True
    return mask


def random_block_masks(batch: int, size: int, num_blocks: int, block_frac: float,
                       device: torch.device | str | None = None) -> Tensor:
    """(batch, size, size) bool masks, each the union of ``num_blocks`` squares of side round(size * block_frac)
    placed uniformly inside the image, independently per sample (torch's global RNG on ``device``)."""
    side = max(1, round(size * block_frac))
    if side > size:
        raise ValueError(f"random_block_masks: block_frac={block_frac} gives blocks larger than the image")
    top = torch.randint(0, size - side + 1, (batch, num_blocks, 1, 1), device=device)  # B x n x 1 x 1
    left = torch.randint(0, size - side + 1, (batch, num_blocks, 1, 1), device=device)
    r = torch.arange(size, device=device)
    rows = (r.view(1, 1, -1, 1) >= top) & (r.view(1, 1, -1, 1) < top + side)  # B x n x S x 1
    cols = (r.view(1, 1, 1, -1) >= left) & (r.view(1, 1, 1, -1) < left + side)  # B x n x 1 x S
    return (rows & cols).any(dim=1)  # B x S x S


def shrink(mask: Tensor, px: int) -> Tensor:
    """``mask`` (..., H, W) eroded by ``px`` pixels (a square structuring element): the hole the encoder
    sees when ``mask`` is the target hole. The image border does not erode (no context lies beyond it)."""
    if px <= 0:
        return mask
    shape = mask.shape
    m = (~mask).reshape(-1, 1, *shape[-2:]).float()
    grown = F.max_pool2d(m, 2 * px + 1, stride=1, padding=px)  # the visible region, dilated
    return (grown < 0.5).reshape(shape)


def overlap_weights(mask: Tensor, overlap: int, overlap_weight: float = 10.0) -> Tensor:
    """Float loss weights of the shape of ``mask`` (the target hole): ``overlap_weight`` on the border of
    the hole that the encoder still sees (``mask`` minus ``shrink(mask, overlap)``), 1 inside, 0 outside."""
    inner = shrink(mask, overlap)
    return inner.float() + (mask & ~inner).float() * overlap_weight


# ---- MAE: random masking of tokens ------------------------------------------------------------------
class TokenMasking(NamedTuple):
    keep: Tensor  # B x K long: indices of the visible tokens, in the (random) order the encoder sees them
    mask: Tensor  # B x L bool: True = masked (the loss is taken there)
    restore: Tensor  # B x L long: position of each original token in [visible..., masked...] (un-shuffles)


def num_visible(num_tokens: int, ratio: float) -> int:
    """Tokens MAE keeps of ``num_tokens`` at mask ``ratio``: int(L x (1 - ratio)), truncated as MAE's
    ``random_masking`` (``len_keep``), at least 1."""
    if not 0 < ratio < 1:
        raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
    return max(1, int(num_tokens * (1 - ratio)))


def random_masking(batch: int, num_tokens: int, ratio: float, device: torch.device | str | None = None) -> TokenMasking:
    """MAE's per-sample random masking: argsort uniform noise; the first int(L (1 - ratio)) of the sorted
    order are kept. ``restore`` = argsort of that order: gathering [visible, masked] tokens with it gives the
    original order back. Randomness: torch's global RNG on ``device``."""
    keep_n = num_visible(num_tokens, ratio)
    noise = torch.rand(batch, num_tokens, device=device)  # B x L
    shuffle = torch.argsort(noise, dim=1)  # B x L: token indices, visible ones first
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    mask[:, :keep_n] = False
    return TokenMasking(shuffle[:, :keep_n], torch.gather(mask, 1, restore), restore)


# ---- BEiT: blockwise masking ------------------------------------------------------------------------
def beit_block_bounds(grid: tuple[int, int], min_block: int | None = None) -> int:
    """The smallest block (in patches) of BEiT's generator: 16 of a 14 x 14 grid in the paper, scaled with the
    grid's area (4 of 7 x 7), at least 1."""
    return min_block if min_block is not None else max(1, round(16 * grid[0] * grid[1] / 196))


def block_mask(grid: tuple[int, int], num_masked: int, min_block: int, min_aspect: float = 0.3,
               rng: np.random.Generator | None = None, max_attempts: int = 200,
               blocks: list | None = None) -> np.ndarray:
    """One (h, w) bool mask of BEiT's Algorithm 1: until ``num_masked`` patches are masked, draw a block area
    s ~ U(lo, max(lo, remaining)) with lo = min(min_block, remaining), an aspect ratio r log-uniform in
    [min_aspect, 1 / min_aspect], a block of round(sqrt(s r)) x round(sqrt(s / r)) patches placed uniformly on
    the grid, and accept it when (after the rounding) its area is >= lo, its aspect ratio within the bounds and it
    masks between 1 and ``remaining`` new patches. The paper draws 10 times per block and stops short when none
    fits; with up to ``max_attempts`` draws the count is exact in practice (tested). ``blocks`` collects the
    accepted blocks as (top, left, height, width, remaining before it)."""
    h, w = grid
    rng = rng if rng is not None else np.random.default_rng()
    mask = np.zeros((h, w), dtype=bool)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    count = 0
    while count < num_masked:
        remaining, added = num_masked - count, 0
        lo = min(min_block, remaining)
        for _ in range(max_attempts):
            area = rng.uniform(lo, max(lo, remaining))
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= bh <= h and 1 <= bw <= w and bh * bw >= lo and min_aspect <= bh / bw <= 1 / min_aspect):
                continue
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
            if 0 < new <= remaining:
                mask[top:top + bh, left:left + bw] = True
                if blocks is not None:
                    blocks.append((top, left, bh, bw, remaining))
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def block_masks(batch: int, grid: tuple[int, int], ratio: float, min_block: int | None = None,
                min_aspect: float = 0.3, device: torch.device | str | None = None) -> Tensor:
    """(batch, h * w) bool BEiT masks of round(ratio x h x w) patches each (see :func:`block_mask`), row-major.
    The per-sample generator runs on the CPU from a seed drawn from torch's global RNG, so
    ``torch.manual_seed`` makes the masks reproducible."""
    num = round(ratio * grid[0] * grid[1])
    if not 0 < ratio < 1 or num < 1:
        raise ValueError(f"block mask ratio {ratio} must be in (0, 1) and mask at least one of {grid[0] * grid[1]} patches")
    rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
    low = beit_block_bounds(grid, min_block)
    masks = np.stack([block_mask(grid, num, low, min_aspect, rng).reshape(-1) for _ in range(batch)])
    return torch.from_numpy(masks).to(device)
