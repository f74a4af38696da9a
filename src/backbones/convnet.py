"""A small convnet for CPU runs and tests: conv3x3-BN-ReLU blocks, max-pool between them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNet(nn.Module):
    """``depth`` blocks of 3x3 conv + BatchNorm + ReLU with widths width * 2^i; 2x2 max-pool after
    every block but the last; then the final pool. ``forward(x) -> (B, out_dim)``;
    ``feature_map(x) -> (B, channels, H / 2^(depth-1), W / 2^(depth-1))`` before the pool (dense pretext
    heads such as colorization read it).

    ``pool_grid`` = g: the final pool averages the feature map over a g x g grid of regions and concatenates
    them (``out_dim = channels * g^2``), so the features keep where things are, not only what they are
    (centred, aligned images such as Fashion-MNIST); g = 1 is the global average pool.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, depth: int = 3, pool_grid: int = 1):
        super().__init__()
        if width < 1 or depth < 1 or pool_grid < 1:
            raise ValueError(f"backbone.width, backbone.depth and backbone.pool_grid must be >= 1, "
                             f"got {width}, {depth}, {pool_grid}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(depth):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < depth - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool_grid = pool_grid
        self.channels = c_in  # of feature_map
        self.out_dim = c_in * pool_grid**2

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # B x channels x h x w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feature_map(x)
        if self.pool_grid == 1:
            return f.mean(dim=(2, 3))  # B x out_dim
        return F.adaptive_avg_pool2d(f, self.pool_grid).flatten(1)  # B x (channels * g * g)
