"""VICReg (Bardes, Ponce & LeCun 2022): invariance (MSE between the views' embeddings), variance (hinge
on each dimension's std) and covariance (off-diagonal covariance squared) terms, computed over the
global batch (embeddings gathered with gradient). As the reference (facebookresearch/vicreg main_vicreg.py): the
expander's last linear has no bias, each view goes through backbone and expander alone (BatchNorm statistics per
view), and a ResNet starts with ``zero_init_residual``."""

from __future__ import annotations

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import vicreg_loss


class VICReg(SSLMethod):
    def __init__(self, backbone, views, optimizer, sim_weight: float = 25.0, var_weight: float = 25.0,
                 cov_weight: float = 1.0, proj_hidden_dim: int = 8192, proj_dim: int = 8192,
                 proj_layers: int = 3, zero_init_residual: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if zero_init_residual:
            init_residual_to_zero(backbone)
        self.weights = dict(sim_weight=sim_weight, var_weight=var_weight, cov_weight=cov_weight)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bias=False)

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector, per_view=True)  # N x D each
        return vicreg_loss(z1, z2, **self.weights, gather=True, return_terms=True)
