"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' batch-standardised
embeddings is pushed to the identity; lambda weighs the off-diagonal (redundancy reduction) term.
The correlation is computed over the global batch (embeddings gathered with gradient). As the reference
(facebookresearch/barlowtwins main.py): the projector's last linear has no bias, each view goes through backbone
and projector alone (BatchNorm statistics per view), and a ResNet starts with ``zero_init_residual``."""

from __future__ import annotations

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import barlow_twins_loss
from src.nn.optim import decay_groups


class BarlowTwins(SSLMethod):
    def __init__(self, backbone, views, optimizer, lambd: float = 0.0051, proj_hidden_dim: int = 8192,
                 proj_dim: int = 8192, proj_layers: int = 3, loss_scale: float = 1.0, bias_lr_ratio: float = 0.024,
                 zero_init_residual: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if zero_init_residual:
            init_residual_to_zero(backbone)
        self.lambd, self.loss_scale, self.bias_lr_ratio = lambd, loss_scale, bias_lr_ratio
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bias=False)

    def param_groups(self):
        weights, biases_and_norms = decay_groups(self.parameters())
        return [weights, {**biases_and_norms, "lr_ratio": self.bias_lr_ratio}]

    def training_loss(self, views):
        z1, z2 = self.embed(views[:2], head=self.projector, per_view=True)  # N x D each
        return self.loss_scale * barlow_twins_loss(z1, z2, self.lambd, gather=True)
