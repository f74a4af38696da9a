"""Momentum (EMA) targets: frozen copies updated from the online network after each optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere: the target starts equal to the online net.

    The copy runs without stochastic depth or dropout (timm's ``DropPath``, torchvision's ``StochasticDepth``,
    ``nn.Dropout``): the references build their teachers without them (DINO's ``main_dino.py`` passes
    ``drop_path_rate`` to the student only; MoCo v3's and BYOL's encoders have none), so two teacher passes on
    one batch give the same targets. Its BatchNorm layers stay as they are: the target is not put in eval mode.
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    for m in target.modules():
        if isinstance(m, _DropoutNd):
            m.p = 0.0
        elif hasattr(m, "drop_prob"):  # timm's DropPath / DropBlock
            m.drop_prob = 0.0
        elif type(m).__name__ == "StochasticDepth":  # torchvision.ops
            m.p = 0.0
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter.

    Buffers (BatchNorm statistics) are not copied: the target keeps the statistics of its own inputs,
    as in MoCo's key encoder and BYOL's target network.
    """
    for p_o, p_t in zip(online.parameters(), target.parameters(), strict=True):
        p_t.lerp_(p_o.detach(), 1.0 - momentum)
