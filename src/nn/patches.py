"""Pseudo-labels of the geometric pretext tasks, as pure tensor functions (no Lightning, no config).

- Rotations: RotNet (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting
  Image Rotations"): :func:`rotate`, :func:`all_rotations`.
- Patch grids: context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation
  Learning by Context Prediction") and jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of
  Visual Representations by Solving Jigsaw Puzzles"): :func:`grid_geometry`, :func:`grid_patches` and
  the shortcut guards :func:`normalize_patches` and :func:`drop_colour` (Doersch et al. sec. 3.1).
- Permutations: Noroozi & Favaro's maximal-Hamming-distance permutation set (sec. 3.2):
  :func:`hamming_permutations`, :func:`permute`, :func:`invert`.

Images are float tensors (B, C, H, W), C in {1, 3}; everything runs on the input's device without a Python
loop over samples, and randomness comes from torch's global RNG on that device.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# The smallest patch (px) a grid task accepts: below 4 px a patch holds too little to tell where it came
# from, and the default backbones need it (ConvNet's two 2x2 max-pools take 4 px to 1 px; a ResNet with the
# CIFAR stem halves 4 px down to 1 px in its strided stages).
MIN_PATCH = 4


# ---- rotations (RotNet) -----------------------------------------------------------------------------
def rotate(x: Tensor, k: Tensor) -> Tensor:
    """Sample i of square images ``x`` (B, C, S, S) rotated by ``k[i]`` x 90 degrees counter-clockwise
    (``k``: LongTensor (B,), values taken mod 4); ``rotate(rotate(x, k), -k) == x`` exactly."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate needs square images, got {tuple(x.shape[-2:])}")
    every = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])  # 4 x B x C x S x S
    return every[k.remainder(4), torch.arange(x.shape[0], device=x.device)]  # B x C x S x S


def all_rotations(x: Tensor) -> tuple[Tensor, Tensor]:
    """RotNet's batch: every image of ``x`` (B, C, S, S) in all four rotations, as images (4B, C, S, S) in
    blocks of B per rotation (0, 90, 180, 270 degrees counter-clockwise) and labels (4B,) in {0, 1, 2, 3}."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"all_rotations needs square images, got {tuple(x.shape[-2:])}")
    images = torch.cat([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])  # 4B x C x S x S
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])  # 4B
    return images, labels


# ---- patch grids (context prediction, jigsaw) ---------------------------------------------------------
class GridGeometry(NamedTuple):
    cell: int  # side of a grid cell (px); the crop's last size % grid rows/columns are not used
    patch: int  # side of a patch: cell - gap
    offset: int  # nominal offset of a patch inside its cell: gap // 2


def smallest_size(grid: int = 3, gap: int = 0, jitter: int = 0, min_patch: int = MIN_PATCH) -> int:
    """The smallest square crop (px) that holds a ``grid`` x ``grid`` grid of patches of at least
    ``min_patch`` px with ``gap`` px between cells: grid * (min_patch + gap). The jitter does not change it,
    as long as it is allowed (jitter <= gap // 2, checked here)."""
    _check_gap(gap, jitter)
    return grid * (min_patch + gap)


def grid_geometry(size: int, grid: int = 3, gap: int = 0, jitter: int = 0,
                  min_patch: int = MIN_PATCH) -> GridGeometry:
    """Cell and patch sizes of a ``grid`` x ``grid`` grid on a square crop of ``size`` px.

    cell = size // grid, patch = cell - gap; a patch sits at ``gap // 2`` inside its cell, moved by a random
    integer jitter in [-jitter, jitter] per axis. ``jitter <= gap // 2`` keeps every patch inside its cell
    (so neighbours are at least gap - 2 * jitter px apart and never overlap)."""
    _check_gap(gap, jitter)
    cell = size // grid
    if cell - gap < min_patch:
        raise ValueError(f"a {size} px crop gives {cell - gap} px patches in a {grid}x{grid} grid with gap {gap}; "
                         f"patches of at least {min_patch} px need a crop of at least "
                         f"{smallest_size(grid, gap, jitter, min_patch)} px")
    return GridGeometry(cell, cell - gap, gap // 2)


def _check_gap(gap: int, jitter: int) -> None:
    if gap < 0 or jitter < 0:
        raise ValueError(f"gap={gap} and jitter={jitter} must be >= 0")
    if jitter > gap // 2:
        raise ValueError(f"jitter={jitter} is more than gap // 2 = {gap // 2}: patches would leave their cells")


def grid_patches(x: Tensor, grid: int = 3, gap: int = 0, jitter: int = 0) -> tuple[Tensor, Tensor]:
    """The ``grid`` x ``grid`` patches of square images ``x`` (B, C, S, S) in row-major order, each jittered
    independently per sample (see :func:`grid_geometry`).

    Returns patches (B, grid * grid, C, p, p) and their top-left corners (B, grid * grid, 2) as (row, column):
    ``patches[b, t] == x[b, :, r:r + p, c:c + p]`` for ``r, c = corners[b, t]``."""
    B, C, H, W = x.shape
    if H != W:
        raise ValueError(f"grid_patches needs square images, got {H}x{W}")
    cell, p, offset = grid_geometry(H, grid, gap, jitter)
    T, dev = grid * grid, x.device
    start = torch.arange(grid, device=dev) * cell + offset  # grid
    nominal = torch.stack(torch.meshgrid(start, start, indexing="ij"), dim=-1).view(1, T, 2)  # 1 x T x 2
    corners = nominal + torch.randint(-jitter, jitter + 1, (B, T, 2), device=dev)  # B x T x 2
    span = torch.arange(p, device=dev)
    rows = (corners[..., 0:1] + span).view(B, T, p, 1)  # B x T x p x 1
    cols = (corners[..., 1:2] + span).view(B, T, 1, p)  # B x T x 1 x p
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    patches = x.permute(0, 2, 3, 1)[b, rows, cols]  # B x T x p x p x C
    return patches.permute(0, 1, 4, 2, 3).contiguous(), corners  # B x T x C x p x p


def normalize_patches(p: Tensor, eps: float = 1e-5) -> Tensor:
    """Each patch (..., C, h, w) to zero mean and unit std per channel, so that no patch can be told by its
    brightness or contrast (Noroozi & Favaro sec. 3.3, Doersch et al. sec. 3.1). ``eps`` is added to the
    variance: a flat patch becomes zeros instead of NaN."""
    mean = p.mean(dim=(-2, -1), keepdim=True)
    var = p.var(dim=(-2, -1), unbiased=False, keepdim=True)
    return (p - mean) / torch.sqrt(var + eps)


def drop_colour(p: Tensor, noise_std: float = 0.01) -> Tensor:
    """Colour dropping (Doersch et al. 2015, sec. 3.1): for RGB patches (..., 3, h, w), keep one randomly
    chosen channel per patch and replace the other two by Gaussian noise of std ``noise_std`` (the paper's
    1/100 of the kept channel's std on normalised patches), against the chromatic-aberration shortcut.
    Grayscale patches (..., 1, h, w) are returned unchanged."""
    if p.shape[-3] == 1:
        return p
    keep = torch.randint(3, p.shape[:-3], device=p.device)  # one channel per patch
    mask = torch.nn.functional.one_hot(keep, 3).to(torch.bool)[..., None, None]  # ... x 3 x 1 x 1
    return torch.where(mask, p, noise_std * torch.randn_like(p))


# ---- permutations (jigsaw) ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _all_permutations(tiles: int) -> np.ndarray:
    """All tiles! permutations of range(tiles) in lexicographic order, (tiles!, tiles) uint8."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(tiles)))
    return np.fromiter(flat, dtype=np.uint8, count=math.factorial(tiles) * tiles).reshape(-1, tiles)


@functools.lru_cache(maxsize=8)
def _hamming_set(num: int, tiles: int, seed: int, rule: str = "mean") -> np.ndarray:
    perms = _all_permutations(tiles)  # N x T
    columns = np.ascontiguousarray(perms.T)  # T x N
    equal = [[columns[j] == v for v in range(tiles)] for j in range(tiles)]  # position j holds value v
    most_matches = np.zeros(len(perms), dtype=np.uint8)  # rule min: tiles - (min Hamming distance to the set)
    total = np.zeros(len(perms), dtype=np.int64)  # rule mean: sum of the Hamming distances to the set
    chosen = [int(np.random.default_rng(seed).integers(len(perms)))]
    taken = np.zeros(len(perms), dtype=bool)
    taken[chosen[0]] = True
    matches = np.empty(len(perms), dtype=np.uint8)
    for _ in range(num - 1):
        last = perms[chosen[-1]]
        matches[:] = equal[0][last[0]]
        for j in range(1, tiles):
            matches += equal[j][last[j]]
        if rule == "min":
            np.maximum(most_matches, matches, out=most_matches)
            chosen.append(int(np.argmin(most_matches)))  # largest min distance; ties -> lowest index
        else:
            total += tiles - matches.astype(np.int64)
            chosen.append(int(np.argmax(np.where(taken, -1, total))))  # largest summed distance; ties -> lowest
        taken[chosen[-1]] = True
    return perms[chosen].astype(np.int64)


PERMUTATION_RULES = ("mean", "min")


def hamming_permutations(num: int, tiles: int = 9, seed: int = 0, rule: str = "mean") -> Tensor:
    """Noroozi & Favaro's permutation set (sec. 3.2, maximal Hamming distance), deterministic for a seed:
    start from the permutation of index chosen by ``seed`` among all tiles! (in lexicographic order), then
    greedily add the permutation farthest from those chosen so far (ties: the lowest index): ``rule="mean"``
    by the sum (mean) of its Hamming distances to them, the paper's Algorithm 1 (D-bar = 1^T D, j = argmax);
    ``rule="min"`` by the smallest of them, which keeps the minimum distance larger. Returns a LongTensor
    (num, tiles); the sets are cached."""
    if tiles < 2 or tiles > 10:
        raise ValueError(f"tiles={tiles}: enumerating tiles! permutations needs 2 <= tiles <= 10")
    if not 1 <= num <= math.factorial(tiles):
        raise ValueError(f"num={num} permutations of {tiles} tiles: must be in [1, {math.factorial(tiles)}]")
    if rule not in PERMUTATION_RULES:
        raise ValueError(f"rule={rule!r}; allowed: {', '.join(PERMUTATION_RULES)}")
    return torch.from_numpy(_hamming_set(num, tiles, seed, rule).copy())


def permute(tiles: Tensor, perm: Tensor) -> Tensor:
    """``out[b, i] = tiles[b, perm[b, i]]`` for tiles (B, T, ...) and permutations ``perm`` (B, T) Long."""
    index = perm.view(*perm.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, index)


def invert(perm: Tensor) -> Tensor:
    """The inverse permutations of ``perm`` (B, T): ``permute(permute(t, perm), invert(perm)) == t``."""
    return perm.argsort(dim=-1)
