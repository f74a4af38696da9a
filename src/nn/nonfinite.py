"""Non-finite losses noted on the device, read back only when asked (no host-device sync per step).

:class:`NonFiniteWatch` keeps, as device tensors, the first optimizer step whose loss was NaN/inf and the loss and
its tensor terms at that step. :meth:`NonFiniteWatch.first_bad_step` reads them back: one reduce over the
processes (the earliest bad step of any rank) and one sync, at the moments the caller chooses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from src.utils.errors import UserError

NONE = 2**62  # "no bad step yet"; larger than any step, so a min over ranks finds the first bad one


class NonFiniteLossError(UserError):
    """Raised when the loss is NaN/inf; the last good checkpoint stays untouched."""


class NonFiniteWatch:
    def __init__(self) -> None:
        self.step: torch.Tensor | None = None  # () long: the first bad step, or NONE
        self.values: dict[str, torch.Tensor] = {}  # "loss" and the tensor terms at that step

    def note(self, loss: torch.Tensor, terms: dict, step: int) -> None:
        """Record ``loss`` (and the tensor values of ``terms``) at ``step`` if it is the first non-finite one.
        Tensor ops only: nothing waits for the device."""
        loss = loss.detach()
        if self.step is None:
            self.step = torch.full((), NONE, dtype=torch.long, device=loss.device)
        first = ~torch.isfinite(loss) & (self.step == NONE)  # () bool
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        values = {"loss": loss, **{k: v.detach() for k, v in terms.items() if isinstance(v, torch.Tensor) and v.numel() == 1}}
        for name, v in values.items():
            v = v.float().reshape(())
            self.values[name] = torch.where(first, v, self.values.get(name, torch.full_like(v, float("nan"))))

    def first_bad_step(self, reduce_min: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> int | None:
        """The first step with a non-finite loss on any process (``reduce_min``: a min over the processes), or
        None. One sync; every process must call it at the same point (it is a collective under DDP)."""
        if self.step is None:
            return None
        step = int(reduce_min(self.step.clone()))
        return None if step == NONE else step

    def first_bad(self, reduce_min: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> str | None:
        """:meth:`describe` of :meth:`first_bad_step` (a collective under DDP), or None when every loss was finite."""
        step = self.first_bad_step(reduce_min)
        return None if step is None else self.describe(step)

    def describe(self, step: int) -> str:
        """``non-finite loss nan at step 14 (term=...)``, with this process's values when the step was its own."""
        if self.step is None or int(self.step) != step:
            return f"non-finite loss at step {step} (on another process)"
        values = dict(self.values)
        return describe(values.pop("loss"), values, step)


def describe(loss: torch.Tensor | float, terms: dict, step: int) -> str:
    """``non-finite loss nan at step 14 (term=...)``: the loss and its terms at ``step``."""
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
    return f"non-finite loss {float(loss)} at step {step}" + (f" ({shown})" if shown else "")


def snapshot_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Copies of every buffer of ``module`` (BatchNorm statistics, queues, centres) before a step that may be
    skipped (``nonfinite_loss=skip``)."""
    return [b.detach().clone() for b in module.buffers()]


@torch.no_grad()
def restore_buffers(module: nn.Module, saved: list[torch.Tensor]) -> None:
    """Put back a :func:`snapshot_buffers`, so a skipped step leaves no trace; submodules that keep host copies of a
    buffer (a feature queue's write position) re-read them through their ``buffers_restored()``."""
    for buffer, value in zip(module.buffers(), saved, strict=True):
        buffer.copy_(value)
    for m in module.modules():
        if hasattr(m, "buffers_restored"):
            m.buffers_restored()
