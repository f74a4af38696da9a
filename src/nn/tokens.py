"""Patch tokens of Vision Transformers as pure tensor functions (no Lightning, no config).

- :func:`patchify` / :func:`unpatchify`: images (B, C, H, W) <-> per-patch pixel vectors (B, L, p*p*C), patches
  in row-major order and each vector laid out (row in patch, column in patch, channel), the layout MAE's
  pixel targets use (He et al. 2021).
- :func:`sincos_2d`: fixed 2-D sine-cosine position embeddings (Vaswani et al. 2017 per axis; MAE and MoCo v3
  use them for ViTs): half the channels encode the row, half the column.
"""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), p * p * C); H and W must be multiples of ``patch``."""
    B, C, H, W = x.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image {H}x{W} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = x.reshape(B, C, h, patch, w, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, patch * patch * C)


def unpatchify(tokens: Tensor, patch: int, grid: tuple[int, int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, h * w, p * p * C) -> (B, C, h * p, w * p) for ``grid`` = (h, w)."""
    B, L, D = tokens.shape
    h, w = grid
    if L != h * w or D != patch * patch * channels:
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} do not fit a {h}x{w} grid of {patch}x{patch} "
                         f"patches with {channels} channels")
    x = tokens.reshape(B, h, w, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * patch, w * patch)


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """(N,) positions -> (N, dim): [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/2)), k < dim/2."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim={dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)  # N x dim/2
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid: tuple[int, int], dim: int) -> Tensor:
    """(h * w, dim) fixed position embeddings of an h x w patch grid in row-major order: the first half of the
    channels encodes the column, the second half the row (as MAE's ``get_2d_sincos_pos_embed``)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim={dim} must be a multiple of 4")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
