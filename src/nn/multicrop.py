"""Multi-crop bookkeeping (SwAV, DINO): a list of views holds runs of equal-sized crops, the global (largest) ones
first. Which views go through the backbone together and which pairs a loss compares."""

from __future__ import annotations

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
