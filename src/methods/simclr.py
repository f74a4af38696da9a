"""SimCLR (Chen et al. 2020): two views, an MLP projector, NT-Xent with negatives from all processes.

As the reference (google-research/simclr): the projector's linears have no bias before BatchNorm and its output
BatchNorm has a scale but no shift (``model_util.projection_head``); the loss is the sum of both directions'
means (``objective.add_contrastive_loss``: loss_a + loss_b), i.e. twice NT-Xent's mean over the 2N anchors; the
two views share one BatchNorm batch (concatenated, as the reference splits its input along channels and stacks
the views); a ResNet starts with its residual blocks' last BatchNorm at zero (``init_zero``).
With a multi-crop recipe (views=multicrop) the loss is twice the mean NT-Xent over every pair of a global view
with another view (each pair once).
"""

from __future__ import annotations

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import nt_xent
from src.nn.multicrop import num_global_views, view_pairs
from src.utils.errors import UserError


class SimCLR(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 0.1, proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, zero_init_residual: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if temperature <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        if zero_init_residual:
            init_residual_to_zero(backbone)
        self.temperature = temperature
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True,
                             last_bn_scale=True)

    def training_loss(self, views):
        z = self.embed(views, head=self.projector)  # V x (N x D): one pass per size, BatchNorm over all views
        n_global = num_global_views(views)
        pairs = [(t, s) for t, s in view_pairs(n_global, len(views)) if s > t or s >= n_global]  # each pair once
        return 2 * sum(nt_xent(z[t], z[s], self.temperature, gather=True) for t, s in pairs) / len(pairs)
