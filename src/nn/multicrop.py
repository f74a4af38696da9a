"""Multi-crop bookkeeping (SwAV, DINO): a list of views holds runs of equal-sized crops, the global (largest) ones
first. Which views go through the backbone together and which pairs a loss compares."""

from __future__ import annotations

from collections.abc import Callable

import torch


def size_runs(views: list[torch.Tensor]) -> list[slice]:
    """Runs of consecutive views with the same spatial size, e.g. [0:2, 2:8] for 2 global + 6 local crops."""
    runs, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            runs.append(slice(start, i))
            start = i
    return runs


def num_global_views(views: list[torch.Tensor]) -> int:
    """How many leading views have the size of the first one (the global crops of a multi-crop recipe)."""
    return size_runs(views)[0].stop


def view_pairs(num_global: int, num_views: int) -> list[tuple[int, int]]:
    """(target view, predicting view) pairs: every global view against every other view, never itself."""
    return [(t, s) for t in range(num_global) for s in range(num_views) if s != t]


def embed_views(views: list[torch.Tensor], backbone: Callable, head: Callable | None = None,
                per_view: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(per-view outputs of head(backbone(view)), the backbone features of the first view)``. Consecutive views of
    one size go through the backbone as one batch and the head (with its BatchNorm) sees all views at once;
    ``per_view``: each view through backbone and head alone, BatchNorm statistics per view (as BYOL, SimSiam, Barlow
    Twins, VICReg and MoCo v3 forward their views)."""
    if per_view:
        feats = [backbone(v) for v in views]  # V x (N x D)
        return [head(f) if head is not None else f for f in feats], feats[0]
    feats = torch.cat([backbone(torch.cat(views[run])) for run in size_runs(views)])  # V N x D
    out = head(feats) if head is not None else feats
    return list(out.chunk(len(views))), feats[: views[0].shape[0]]
