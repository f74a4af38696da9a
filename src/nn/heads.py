"""Projection / prediction heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


class MLP(nn.Sequential):
    """``num_layers`` linear layers; hidden ones followed by BatchNorm (optional) and ReLU (or GELU).

    ``num_layers=1`` is the linear head of MoCo v1; 2 is SimCLR's / MoCo v2's MLP head;
    ``last_bn`` adds a BatchNorm without affine on the output (SimSiam, MoCo v3, NNCLR).
    Hidden linears have a bias only without BatchNorm; the last one has one unless ``last_bias`` says otherwise
    (default: no bias before ``last_bn``; MoCo v3's predictor, BYOL's, Barlow Twins' and VICReg's heads have none).
    ``last_bn_scale``: the output BatchNorm keeps a learned scale but no shift (SimCLR's projection head:
    ``batch_norm_relu(..., center=False)`` after its last bias-free linear).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_bn: bool = False, activation: str = "relu",
                 last_bias: bool | None = None, last_bn_scale: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            layers += [ACTIVATIONS[activation]()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_bn if last_bias is None else last_bias))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_scale))
            if last_bn_scale:
                layers[-1].register_parameter("bias", None)  # scale only
        super().__init__(*layers)


class NormalizedLinear(nn.Module):
    """Weight-normalised linear layer without bias, W = g * V / ||V|| row-wise (Salimans & Kingma 2016).

    ``learn_norm=False`` fixes g = 1 (DINO's ``norm_last_layer``, which the paper finds stabilises training).
    V starts as ``nn.Linear``'s default weight (DINO's head wraps a fresh ``nn.Linear`` in ``weight_norm`` after its
    truncated-normal init of the MLP): the rows' norm sets how fast their directions move under AdamW.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self.weight_g = nn.Parameter(torch.ones(out_dim), requires_grad=learn_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g.unsqueeze(1) * F.normalize(self.weight_v, dim=1)  # K x D
        return F.linear(x, w)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3.1): an MLP (GELU, no BatchNorm by default) to
    a bottleneck, L2 normalisation, then a weight-normalised linear layer to ``out_dim`` logits."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = MLP(in_dim, hidden_dim, bottleneck_dim, num_layers=num_layers, batch_norm=batch_norm,
                       activation="gelu")
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=1))
