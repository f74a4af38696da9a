"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives and no momentum encoder.

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D = negative cosine   (Algorithm 1)

The projector ends in BatchNorm; the predictor keeps a fixed learning rate (the paper's fix_pred_lr).
``stop_gradient=false`` is the paper's ablation (Sec. 4.1, Fig. 2): without the stop-gradient the representation
collapses to a constant, which the representation health callback reports.
"""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import negative_cosine
from src.nn.optim import decay_groups


class SimSiam(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 2048, proj_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512, fixed_predictor_lr: bool = True, stop_gradient: bool = True,
                 **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim)
        self.fixed_predictor_lr, self.stop_gradient = fixed_predictor_lr, stop_gradient

    def param_groups(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("predictor.")]
        return decay_groups(rest) + decay_groups(self.predictor.parameters(), fixed_lr=self.fixed_predictor_lr)

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector)  # N x D each
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        t1, t2 = (z1.detach(), z2.detach()) if self.stop_gradient else (z1, z2)  # targets
        loss = negative_cosine(p1, t2) / 2 + negative_cosine(p2, t1) / 2
        z_std = torch.nn.functional.normalize(z1.detach(), dim=1).std(dim=0).mean()  # ~1/sqrt(D) unless collapsed
        return loss, {"z_std": z_std}
