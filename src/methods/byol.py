"""BYOL (Grill et al. 2020): an online network predicts the projection of an EMA target network.

With two views the loss is the paper's symmetric 2 - 2 cos(q, z'); with a multi-crop recipe every view
predicts the target projection of every other global view (only global views go through the target).
"""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import MLP
from src.nn.losses import negative_cosine
from src.nn.multicrop import num_global_views, view_pairs


class BYOL(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, momentum: float = 0.996, momentum_end: float = 1.0, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, momentum_end=momentum_end, **kwargs)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim)
        self.backbone_t, self.projector_t = frozen_copy(self.backbone), frozen_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_t), (self.projector, self.projector_t)]

    def training_loss(self, views):
        n_global = num_global_views(views)
        q = self.embed(views, head=lambda f: self.predictor(self.projector(f)))  # V x (N x D)
        with torch.no_grad():
            z_t = self.embed(views[:n_global], head=self.projector_t, backbone=self.backbone_t)  # G x (N x D)
        pairs = view_pairs(n_global, len(views))
        loss = sum(2 + 2 * negative_cosine(q[s], z_t[t]) for t, s in pairs) / len(pairs)
        return loss
