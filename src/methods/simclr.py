"""SimCLR (Chen et al. 2020): two views, an MLP projector, NT-Xent with negatives from all processes.

With a multi-crop recipe (views=multicrop) the loss is the mean NT-Xent over every pair of a global view
with another view (each pair once).
"""

from __future__ import annotations

from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import nt_xent
from src.nn.multicrop import num_global_views, view_pairs
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
        z = self.embed(views, head=self.projector)  # V x (N x D): one pass per size, BatchNorm over all views
        n_global = num_global_views(views)
        pairs = [(t, s) for t, s in view_pairs(n_global, len(views)) if s > t or s >= n_global]  # each pair once
        return sum(nt_xent(z[t], z[s], self.temperature, gather=True) for t, s in pairs) / len(pairs)
