"""Masks of Context Encoders (Pathak et al. 2016): the central region, random blocks, and the overlap.

Masks are boolean, True = missing (hidden from the encoder, predicted by the decoder). The paper's
"overlap": the hole the encoder sees is the target hole shrunk by ``overlap`` px on every side, and the
reconstruction loss weighs that visible border of the target ``overlap_weight`` (10 in the paper) times
more than the inside of the hole.
"""

from __future__ import annotations

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
