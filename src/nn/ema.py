"""Momentum (EMA) targets: frozen copies updated from the online network after each optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: the target starts equal to the online net."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter.

    Buffers (BatchNorm statistics) are not copied: the target keeps the statistics of its own inputs,
    as in MoCo's key encoder and BYOL's target network.
    """
    for p_o, p_t in zip(online.parameters(), target.parameters(), strict=True):
        p_t.lerp_(p_o.detach(), 1.0 - momentum)
