"""SimCLR (Chen et al. 2020): two views, an MLP projector, NT-Xent with negatives from all processes."""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import nt_xent
from src.utils.errors import UserError


class SimCLR(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 0.5, proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if temperature <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        self.temperature = temperature
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers)

    def training_loss(self, views):
        x1, x2 = views[:2]  # N x C x H x W each
        z = self.projector(self.forward(torch.cat([x1, x2])))  # 2N x D: one pass, BatchNorm over both views
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature, gather=True)
