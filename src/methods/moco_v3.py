"""MoCo v3 (Chen, Xie & He 2021): symmetric contrastive loss between the two views' queries and the
momentum encoder's keys, negatives from the batch of every process (no queue).

    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2 tau * CE(q k_all^T / tau, labels + N * rank)   (Algorithm 1)

The query encoder is backbone + projector + predictor; the key encoder is a momentum copy of backbone +
projector, its momentum rising by cosine from ``momentum`` to 1. Works with any backbone (ResNet, ViT).
"""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import MLP
from src.nn.losses import info_nce


class MoCoV3(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 1.0, proj_hidden_dim: int = 4096,
                 proj_dim: int = 256, proj_layers: int = 2, pred_hidden_dim: int = 4096,
                 momentum: float = 0.99, momentum_end: float = 1.0, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, momentum_end=momentum_end, **kwargs)
        self.temperature = temperature
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, last_bn=False)
        self.backbone_k, self.projector_k = frozen_copy(self.backbone), frozen_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_k), (self.projector, self.projector_k)]

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return 2 * self.temperature * info_nce(q, k, temperature=self.temperature, gather=True)

    def training_loss(self, views):
        q1, q2 = self.embed(views[:2], head=lambda f: self.predictor(self.projector(f)))  # N x C each
        with torch.no_grad():
            k1, k2 = self.embed(views[:2], head=self.projector_k, backbone=self.backbone_k)  # N x C each
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)
