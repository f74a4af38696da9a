"""Schedules as pure functions of the global step (as in DINO's ``cosine_scheduler``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (last step), e.g. BYOL's EMA momentum 0.996 -> 1."""
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))
