"""Context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction"): where is a neighbouring patch relative to the centre one?

From a 3x3 grid of patches (with a gap and a random jitter, sec. 3) take the centre patch and one of its 8
neighbours per image; the backbone embeds both (one batched pass), their features are concatenated (centre
first) and an MLP classifies the neighbour's position into 8 classes. Shortcut guards (sec. 3.1): every
patch is normalised on its own, and colour dropping (RGB only) hides chromatic aberration.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from src.methods.pretext_base import PretextTask, correct_fraction, crop_size
from src.nn.heads import MLP
from src.nn.patches import MIN_PATCH, drop_colour, grid_patches, normalize_patches, smallest_size
from src.utils.errors import UserError

GRID = 3
CENTRE = 4  # the centre of the 3x3 grid in row-major order; neighbour class c is tile c + (c >= 4)


def check_gap(gap: int, jitter: int) -> None:
    """UserError one-liners for the gap and jitter (px) of a grid task."""
    if gap < 0 or jitter < 0:
        raise UserError(f"method.gap={gap} and method.jitter={jitter} must be >= 0")
    if jitter > gap // 2:
        raise UserError(f"method.jitter={jitter} is more than method.gap // 2 = {gap // 2}: patches would leave "
                        "their cells; lower method.jitter or raise method.gap")


def grid_problems(cls: type, cfg: DictConfig) -> list[str]:
    """One line when views.crops[0].size cannot hold the 3x3 grid of ``cls`` with method.gap and method.jitter,
    and one when the jitter is more than gap // 2."""
    defaults = inspect.signature(cls.__init__).parameters
    gap = cfg.method.get("gap", defaults["gap"].default)
    jitter = cfg.method.get("jitter", defaults["jitter"].default)
    if gap < 0 or jitter < 0:
        return [f"method.gap={gap} and method.jitter={jitter} must be >= 0"]
    problems = []
    if jitter > gap // 2:
        problems.append(f"method.jitter={jitter} is more than method.gap // 2 = {gap // 2}: patches would leave "
                        "their cells; lower method.jitter or raise method.gap")
    size, need = crop_size(cfg), smallest_size(GRID, gap, 0)
    if size is not None and size < need:
        problems.append(f"{cls.__name__} needs views.crops[0].size >= {need} for a {GRID}x{GRID} grid with gap {gap} "
                        f"and jitter {jitter} (patches of at least {MIN_PATCH} px); got {size}: raise "
                        "data.crop_size/views.crops[0].size or lower method.gap")
    return problems


class RelativePatch(PretextTask):
    min_global_batch = 2  # the MLP head's BatchNorm needs two images

    def __init__(self, backbone, views, optimizer, gap: int = 2, jitter: int = 1, color_drop: bool = True,
                 head_hidden_dim: int = 1024, head_layers: int = 3, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        check_gap(gap, jitter)
        if head_layers < 1:
            raise UserError(f"method.head_layers={head_layers} must be >= 1 (1: a linear classifier)")
        self.gap, self.jitter, self.color_drop = gap, jitter, color_drop
        self.head = MLP(2 * backbone.out_dim, head_hidden_dim, 8, num_layers=head_layers)

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S
        B = x.shape[0]
        patches, _ = grid_patches(x, GRID, self.gap, self.jitter)  # B x 9 x C x p x p
        label = torch.randint(8, (B,), device=x.device)  # which neighbour
        neighbour = label + (label >= CENTRE).long()  # its tile in the grid
        pair = torch.stack([patches[:, CENTRE], patches[torch.arange(B, device=x.device), neighbour]], 1)
        pair = normalize_patches(pair)  # B x 2 x C x p x p
        if self.color_drop:
            pair = drop_colour(pair)
        features = self.online(pair.flatten(0, 1)).view(B, -1)  # B x 2D: centre, neighbour
        logits = self.head(features)  # B x 8
        return F.cross_entropy(logits, label), {"pretext_acc": correct_fraction(logits.detach(), label)}

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        return super().config_problems(cfg, global_batch, num_views) + grid_problems(cls, cfg)
