"""Small dense heads on a backbone's feature map (B x D x h x w) for the pixel pretext tasks: a per-pixel
classifier (colorization, split-brain) and an upsampling image decoder (context encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class DenseClassifier(nn.Module):
    """conv3x3-BN-ReLU (``in_dim`` -> ``hidden_dim``), then conv1x1 to ``num_classes`` logits per pixel.

    ``forward(f, size)`` resizes the hidden map bilinearly to size x size before the 1x1 conv; a 1x1 conv
    commutes with bilinear resizing, so this equals upsampling the logits, at the cost of the hidden width."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int):
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_dim, hidden_dim))
        self.out = nn.Conv2d(hidden_dim, num_classes, 1)

    def forward(self, f: torch.Tensor, size: int | None = None) -> torch.Tensor:
        h = self.block(f)  # B x hidden x h x w
        if size is not None and h.shape[-2:] != (size, size):
            h = F.interpolate(h, size=(size, size), mode="bilinear", align_corners=False)
        return self.out(h)  # B x K x size x size


class ImageDecoder(nn.Module):
    """From a feature map of side ``in_size`` to an image of side ``out_size``: stages of x2 nearest
    upsample + conv3x3-BN-ReLU (widths halving from ``in_dim``, at least ``min_width``) until the side is
    >= ``out_size``, then a bilinear resize to ``out_size`` and a conv1x1 to ``out_channels``."""

    def __init__(self, in_dim: int, out_channels: int, in_size: int, out_size: int, min_width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        side, width = in_size, in_dim
        while side < out_size:
            c_out = max(width // 2, min_width)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), *conv_bn_relu(width, c_out)]
            side, width = side * 2, c_out
        self.up = nn.Sequential(*layers)
        self.out_size = out_size
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, f: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Image (B x out_channels x size x size) from ``f`` (B x in_dim x in_size x in_size); ``size``
        defaults to ``out_size`` (another size suits inputs of another size, e.g. larger evaluation views)."""
        size = size or self.out_size
        h = self.up(f)  # B x width x >= out_size
        if h.shape[-2:] != (size, size):
            h = F.interpolate(h, size=(size, size), mode="bilinear", align_corners=False)
        return self.out(h)  # B x out_channels x size x size


def needs_feature_map(backbone: nn.Module, who: str) -> None:
    """Dense heads read ``backbone.feature_map(x) -> B x D x h x w``: raise ValueError naming ``who`` without it."""
    if not callable(getattr(backbone, "feature_map", None)):
        raise ValueError(f"{who} needs a backbone with feature_map(x) -> B x D x h x w (backbone=convnet, resnet18, "
                         f"resnet50); {type(backbone).__name__} has none")


def feature_channels(backbone: nn.Module) -> int:
    """Channels of ``backbone.feature_map``: ``backbone.channels`` where the pooled features are wider than the map
    (a convnet with ``pool_grid`` > 1 concatenates g x g regions), else ``out_dim``."""
    return int(getattr(backbone, "channels", backbone.out_dim))


@torch.no_grad()
def feature_map_size(backbone: nn.Module, channels: int, size: int) -> int:
    """Side of ``backbone.feature_map`` for size x size inputs of ``channels`` channels (one probe in eval
    mode on the backbone's device; the training mode is restored)."""
    mode = backbone.training
    p = next(backbone.parameters())
    try:
        backbone.eval()
        return backbone.feature_map(torch.zeros(1, channels, size, size, device=p.device, dtype=p.dtype)).shape[-1]
    finally:
        backbone.train(mode)
