"""torchvision ResNets as feature extractors, with the CIFAR stem as an option."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from src.backbones.pretrained import load_pretrained, pretrained_problems


class ResNet(nn.Module):
    """``forward(x) -> (B, out_dim)`` pooled features of a torchvision ResNet (fc removed);
    ``feature_map(x) -> (B, out_dim, h, w)`` the last stage before the pool (dense pretext heads read it).

    ``cifar_stem=True`` replaces the 7x7/2 conv + max-pool with a 3x3/1 conv and no pool, the usual
    choice for 32x32 images. ``in_channels`` != 3 replaces the first conv (grayscale data). ``pretrained``: a
    weights file (a torchvision state dict, a MoCo/DINO/our checkpoint; prefixes handled; an RGB first conv is
    summed for grayscale data).
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3, cifar_stem: bool = False,
                 zero_init_residual: bool = False, pretrained: str | None = None):
        super().__init__()
        if arch not in {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}:
            raise ValueError(f"backbone.arch={arch!r} is not a ResNet; use resnet18/34/50/101/152")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.pretrained = pretrained
        if pretrained:
            load_pretrained(net, pretrained, f"this {arch}" + (" with the CIFAR stem" if cifar_stem else ""))

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        return pretrained_problems(cfg.backbone.get("pretrained"))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))  # B x out_dim x h x w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3))  # B x out_dim


@torch.no_grad()
def zero_init_residual(backbone: nn.Module) -> None:
    """Zero the last BatchNorm scale of every residual block of a :class:`ResNet` (torchvision's
    ``zero_init_residual=True``; SimCLR's ``init_zero``, BYOL's ``scale_init=zeros``), so each block starts as the
    identity, as the SimCLR, BYOL, SimSiam, Barlow Twins, VICReg and MoCo v3 references build their ResNets. Any other
    backbone (no residual blocks), or a ResNet whose weights came from a file, is left as it is."""
    if not isinstance(backbone, ResNet) or backbone.pretrained:
        return
    for m in backbone.net.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(m.bn3.weight)
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(m.bn2.weight)
