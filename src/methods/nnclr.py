"""NNCLR (Dwibedi et al. 2021): the positive of a view is the nearest neighbour of its projection in a
support set (a queue of past projections), contrasted against the other view's predictions.

    loss = (ctr(NN(z1), p2) + ctr(NN(z2), p1)) / 2,   ctr = InfoNCE with in-batch negatives   (eq. 2)

The support set is a queue of buffers filled with the first view's projections of every process (rank order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import info_nce
from src.nn.queue import FeatureQueue, queue_size_problems


class NNCLR(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 0.1, queue_size: int = 98304,
                 proj_hidden_dim: int = 2048, proj_dim: int = 256, pred_hidden_dim: int = 4096, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        self.temperature = temperature
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=3, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim)
        self.support = FeatureQueue(queue_size, proj_dim)  # K x D, normalised projections

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        return (super().config_problems(cfg, global_batch, num_views)
                + queue_size_problems(cfg.method, global_batch, default=98304))

    @torch.no_grad()
    def nearest_neighbour(self, z: torch.Tensor) -> torch.Tensor:
        """The support-set entry most cosine-similar to each row of z (N x D). Only written entries are
        searched; before the first write each projection is its own neighbour."""
        z = F.normalize(z, dim=1)
        support = self.support.written()  # S x D
        if support.shape[0] == 0:
            return z
        idx = torch.einsum("nd,sd->ns", z, support).argmax(dim=1)  # N
        return support[idx]

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector)  # N x D each
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        nn1, nn2 = self.nearest_neighbour(z1.float()), self.nearest_neighbour(z2.float())
        loss = (info_nce(nn1, p2, temperature=self.temperature, gather=True)
                + info_nce(nn2, p1, temperature=self.temperature, gather=True)) / 2
        self.support.push(F.normalize(z1.detach().float(), dim=1))  # every process's, rank order
        return loss
