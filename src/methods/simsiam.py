"""SimSiam (Chen & He 2021): a predictor and a stop-gradient, no negatives and no momentum encoder.

    L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,   D = negative cosine   (Algorithm 1)

The projector ends in BatchNorm; the predictor keeps a fixed learning rate (the paper's fix_pred_lr). As the
reference (facebookresearch/simsiam): each view goes through encoder, projector and predictor alone (BatchNorm
statistics per view), SGD decays every parameter (``main_simsiam.py``), and a ResNet starts with
``zero_init_residual``.
``stop_gradient=false`` is the paper's ablation (Sec. 4.1, Fig. 2): without the stop-gradient the representation
collapses to a constant, which the representation health callback reports.
"""

from __future__ import annotations

import torch

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import negative_cosine


class SimSiam(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 2048, proj_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512, fixed_predictor_lr: bool = True, stop_gradient: bool = True,
                 zero_init_residual: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if zero_init_residual:
            init_residual_to_zero(backbone)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim)
        self.fixed_predictor_lr, self.stop_gradient = fixed_predictor_lr, stop_gradient

    def param_groups(self):
        """The encoder and the predictor (fixed lr), weight decay on every parameter (main_simsiam.py)."""
        rest = [p for n, p in self.named_parameters() if not n.startswith("predictor.") and p.requires_grad]
        return [{"params": rest}, {"params": list(self.predictor.parameters()), "fixed_lr": self.fixed_predictor_lr}]

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector, per_view=True)  # N x D each
        p1, p2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if self.stop_gradient else (z1, z2)  # targets
        loss = negative_cosine(p1, t2) / 2 + negative_cosine(p2, t1) / 2
        z_std = torch.nn.functional.normalize(z1.detach(), dim=1).std(dim=0).mean()  # ~1/sqrt(D) unless collapsed
        return loss, {"z_std": z_std}
