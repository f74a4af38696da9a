"""Schedules as pure functions of the global step (as in DINO's ``cosine_scheduler``)."""

from __future__ import annotations

import math
from collections.abc import Callable


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


def warmup_steps(epochs: float, total_steps: int, max_epochs: int, what: str = "warm-up",
                 say: Callable[[str], None] = print) -> int:
    """``epochs`` of a warm-up in optimizer steps of a ``total_steps``-step, ``max_epochs``-epoch run, capped at half
    the run (e.g. a paper's 10 warm-up epochs in a 5-epoch CPU run); ``say`` tells when it is capped."""
    steps = int(epochs * max(total_steps // max(max_epochs, 1), 1))
    if steps > total_steps // 2:
        say(f"{what} of {epochs} epochs is more than half of this {max_epochs}-epoch run; using {total_steps // 2} "
            "steps instead")
        steps = total_steps // 2
    return steps
