"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives and no momentum encoder.

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D = negative cosine   (Algorithm 1)

The projector ends in BatchNorm; the predictor keeps a fixed learning rate (the paper's fix_pred_lr).
"""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod, decay_groups
from src.nn.heads import MLP
from src.nn.losses import negative_cosine


class SimSiam(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 2048, proj_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512, fixed_predictor_lr: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim)
        self.fixed_predictor_lr = fixed_predictor_lr

    def param_groups(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("predictor.")]
        return decay_groups(rest) + decay_groups(self.predictor.parameters(), fixed_lr=self.fixed_predictor_lr)

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector)  # N x D each
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = negative_cosine(p1, z2.detach()) / 2 + negative_cosine(p2, z1.detach()) / 2
        z_std = torch.nn.functional.normalize(z1.detach(), dim=1).std(dim=0).mean()  # ~1/sqrt(D) unless collapsed
        return loss, {"z_std": z_std}
