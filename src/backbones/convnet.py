"""A small convnet for CPU runs and tests: conv3x3-BN-ReLU blocks, max-pool between them."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``depth`` blocks of 3x3 conv + BatchNorm + ReLU with widths width * 2^i; 2x2 max-pool after
    every block but the last; global average pool. ``forward(x) -> (B, out_dim)``;
    ``feature_map(x) -> (B, out_dim, H / 2^(depth-1), W / 2^(depth-1))`` before the pool (dense pretext
    heads such as colorization read it)."""

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 3):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"backbone.width and backbone.depth must be >= 1, got {width}, {depth}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # B x out_dim x h x w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))  # B x out_dim
