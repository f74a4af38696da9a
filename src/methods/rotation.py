"""RotNet (Gidaris, Singh & Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"): every image in all four rotations (0, 90, 180, 270 degrees) in the same batch, and a 4-way
classifier on the pooled backbone features predicts the rotation.

``single_rotation=True`` rotates each image once, at random, instead (a quarter of the compute per image;
the paper finds all four rotations in one batch better, sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.methods.pretext_base import PretextTask, correct_fraction
from src.nn.heads import MLP
from src.nn.patches import all_rotations, rotate
from src.utils.errors import UserError


class Rotation(PretextTask):
    def __init__(self, backbone, views, optimizer, single_rotation: bool = False, head_hidden_dim: int = 512,
                 head_layers: int = 1, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if head_layers < 1:
            raise UserError(f"method.head_layers={head_layers} must be >= 1 (1: a linear classifier)")
        self.single_rotation = single_rotation
        self.head = MLP(backbone.out_dim, head_hidden_dim, 4, num_layers=head_layers)

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S
        if self.single_rotation:
            labels = torch.randint(4, (x.shape[0],), device=x.device)  # B
            x = rotate(x, labels)  # B x C x S x S
        else:
            x, labels = all_rotations(x)  # 4B x C x S x S, 4B
        logits = self.head(self.online(x))  # 4B x 4
        return F.cross_entropy(logits, labels), {"pretext_acc": correct_fraction(logits.detach(), labels)}
