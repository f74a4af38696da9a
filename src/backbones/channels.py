"""Adapt an injected backbone to another number of input channels (colorization reads L, split-brain's
halves read L and ab): the first convolution is replaced by a freshly initialised one."""

from __future__ import annotations

from torch import nn


def with_in_channels(backbone: nn.Module, channels: int) -> nn.Module:
    """``backbone`` with its first ``nn.Conv2d`` (in registration order) taking ``channels`` inputs.

    The module is changed in place and returned; a first convolution that already takes ``channels``
    inputs is left as it is."""
    for parent in backbone.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != channels:
                    setattr(parent, name, nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride,
                                                    child.padding, child.dilation, child.groups,
                                                    child.bias is not None, child.padding_mode))
                return backbone
    raise ValueError(f"{type(backbone).__name__} has no nn.Conv2d whose input channels could be changed")
