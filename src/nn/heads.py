"""Projection / prediction heads."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``num_layers`` linear layers; hidden ones followed by BatchNorm (optional) and ReLU.

    ``num_layers=1`` is the linear head of MoCo v1; 2 is SimCLR's / MoCo v2's MLP head;
    ``last_bn`` adds a BatchNorm without affine on the output (SimSiam, Barlow Twins).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_bn: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
