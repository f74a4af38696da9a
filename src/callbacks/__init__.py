"""Evaluation callbacks: they decide *when* to evaluate during training; :mod:`src.protocols` says *how*."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info


def labels_available(trainer: Any, callback: Any, what: str) -> bool:
    """True when the datamodule has labels; otherwise says once per callback that ``what`` is skipped."""
    if getattr(trainer.datamodule, "has_labels", False):
        return True
    if not getattr(callback, "_skip_said", False):
        rank_zero_info(f"{what} skipped: data has no labels")
        callback._skip_said = True
    return False
