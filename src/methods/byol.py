"""BYOL (Grill et al. 2020): an online network predicts the projection of an EMA target network.

As the reference (deepmind-research/byol): the projector and predictor are Linear - BN - ReLU - Linear without a
last bias (``utils/networks.py``), each view goes through the networks alone (BatchNorm statistics per view), the
loss is the sum of both directions' mean 2 - 2 cos(q, z') (``byol_experiment.py``), and a ResNet starts with its
residual blocks' last BatchNorm scale at zero (haiku's ``scale_init=zeros``). With a multi-crop recipe every view
predicts the target projection of every other global view (only global views go through the target); the loss is
then twice the mean over those pairs.
"""

from __future__ import annotations

import torch

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import MLP
from src.nn.losses import negative_cosine
from src.nn.multicrop import num_global_views, view_pairs


class BYOL(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, momentum: float = 0.996, momentum_end: float = 1.0,
                 zero_init_residual: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, momentum_end=momentum_end, **kwargs)
        if zero_init_residual:
            init_residual_to_zero(backbone)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, last_bias=False)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim, last_bias=False)
        self.backbone_t, self.projector_t = frozen_copy(self.backbone), frozen_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_t), (self.projector, self.projector_t)]

    def training_loss(self, views):
        n_global = num_global_views(views)
        q = self.embed(views, head=lambda f: self.predictor(self.projector(f)), per_view=True)  # V x (N x D)
        with torch.no_grad():
            z_t = self.embed(views[:n_global], head=self.projector_t, backbone=self.backbone_t, per_view=True)
        pairs = view_pairs(n_global, len(views))
        return 2 * sum(2 + 2 * negative_cosine(q[s], z_t[t]) for t, s in pairs) / len(pairs)
