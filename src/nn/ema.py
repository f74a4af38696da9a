"""Momentum (EMA) targets: frozen copies updated from the online network after each optimizer step, and the
per-group BatchNorm of MoCo's key encoder (shuffled BatchNorm)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from src.utils import distributed as du


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


class SplitBatchNorm(nn.Module):
    """BatchNorm whose training statistics are those of each of ``splits`` consecutive groups of the batch on this
    process: MoCo's key encoder with shuffled BatchNorm (He et al. 2020, sec. 3.3). The reference normalises each
    GPU's slice of the shuffled key batch on its own (per-GPU BatchNorm); its one-GPU demo (``SplitBatchNorm``,
    ``--bn-splits 8``) splits the batch into 8 such groups. ``splits=None``: 8 on a single process (the reference's
    8 GPUs), 1 per process under DDP. A group count that does not divide the batch falls to the largest one that
    does with at least 2 images a group. Running statistics: the mean over the groups (as the demo).

    Not a ``_BatchNorm`` subclass, so ``SyncBatchNorm.convert_sync_batchnorm`` (``hardware=ddp``) leaves it per
    process. Same parameters, buffers and state-dict keys as the BatchNorm it replaces (EMA pairs line up).
    """

    def __init__(self, bn: _BatchNorm, splits: int | None = None):
        super().__init__()
        if splits is not None and splits < 1:
            raise ValueError(f"SplitBatchNorm: splits={splits} must be >= 1 or None")
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats, self.splits = bn.affine, bn.track_running_stats, splits
        self.weight, self.bias = bn.weight, bn.bias  # Parameters or None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name))
        self.train(bn.training)

    def groups(self, n: int) -> int:
        """The number of groups a batch of ``n`` images is split into."""
        want = self.splits if self.splits is not None else (8 if du.world_size() == 1 else 1)
        return next(g for g in range(min(want, n // 2), 0, -1) if n % g == 0) if n >= 2 else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        g = self.groups(n)
        grouped = x.reshape(g, n // g, c, *rest).transpose(0, 1).reshape(n // g, g * c, *rest)  # group j: channels j
        track = self.training and self.track_running_stats
        mean = self.running_mean.repeat(g) if track else None
        var = self.running_var.repeat(g) if track else None
        factor = 0.0
        if track:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        weight = self.weight.repeat(g) if self.weight is not None else None
        bias = self.bias.repeat(g) if self.bias is not None else None
        out = F.batch_norm(grouped, mean, var, weight, bias, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(g, c).mean(0))
                self.running_var.copy_(var.view(g, c).mean(0))
        return out.reshape(n // g, g, c, *rest).transpose(0, 1).reshape(n, c, *rest)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, splits={self.splits}"


def split_batchnorm(module: nn.Module, splits: int | None = None) -> nn.Module:
    """Replace every BatchNorm of ``module`` (in place) by a :class:`SplitBatchNorm` holding its parameters and
    statistics; returns ``module``."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, SplitBatchNorm(child, splits))
        else:
            split_batchnorm(child, splits)
    return module
