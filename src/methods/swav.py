"""SwAV (Caron et al. 2020): swapped prediction of online cluster assignments. The codes of each global
crop, computed by Sinkhorn-Knopp over the batch of all processes (and an optional queue), are predicted
from every other crop of the multi-crop recipe (eq. 1-3).

The prototypes are L2-normalised before every step and get no gradient during the first
``freeze_prototypes_steps`` optimizer steps. The queue (``main_swav.py``: ``queue_length`` entries over all
processes) starts at ``queue_start_epoch`` (``epoch_queue_starts``), holds the latest embeddings of the global crops
of every process and joins the Sinkhorn problem once full. The reference keeps queue_length / world rows on each
process, its own embeddings; here every process holds the whole queue (filled with the gathered embeddings, so it
checkpoints and resumes whatever the world size) and adds its 1 / world slice to the Sinkhorn problem: the global
problem, and so every code, is the reference's, since Sinkhorn-Knopp does not depend on which process holds a row.
As the reference's LARC, LARS adapts and decays every parameter (biases and BatchNorm included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.base import SSLMethod
from src.nn.heads import MLP
from src.nn.losses import swav_loss
from src.nn.multicrop import num_global_views
from src.nn.queue import FeatureQueue, queue_size_problems
from src.utils import distributed as du
from src.utils.errors import UserError


class SwAV(SSLMethod):
    def __init__(self, backbone, views, optimizer, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 num_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 epsilon: float = 0.05, queue_size: int = 0, queue_start_epoch: int = 15,
                 freeze_prototypes_steps: int = 313, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        # one queue of past embeddings per global crop (Q x D each, Q over all processes); none when queue_size is 0
        self.queues = nn.ModuleList([FeatureQueue(queue_size, proj_dim) for _ in range(2)] if queue_size > 0 else [])

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        return (super().config_problems(cfg, global_batch, num_views)
                + queue_size_problems(cfg.method, global_batch, default=0, allow_zero=True))

    def param_groups(self):
        """One group: main_swav.py wraps SGD over model.parameters() (weight decay on all) in LARC (all adapted)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def frozen_parameters(self):
        return [self.prototypes.weight] if self.global_step < self.hparams.freeze_prototypes_steps else []

    def use_queue(self) -> bool:
        return (len(self.queues) > 0 and self.current_epoch >= self.hparams.queue_start_epoch
                and all(q.is_full() for q in self.queues))

    @staticmethod
    def local_rows(queue: FeatureQueue) -> torch.Tensor:
        """This process's slice of the queue ((Q / world) x D): its share of the global Sinkhorn problem."""
        n = queue.size // du.world_size()
        return queue.features[du.rank() * n : (du.rank() + 1) * n]

    def training_loss(self, views):
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        n_global = num_global_views(views)
        z = [F.normalize(x, dim=1) for x in self.embed(views, head=self.projector)]  # V x (N x D)
        scores = list(self.prototypes(torch.cat(z)).chunk(len(views)))  # V x (N x K)
        h = self.hparams
        queue_scores = None
        if self.queues:
            if n_global != len(self.queues):
                raise UserError(f"SwAV's queue holds 2 global crops but the views give {n_global}; "
                                "use views=multicrop or method.queue_size=0")
            if self.use_queue():
                queue_scores = [self.prototypes(self.local_rows(q)) for q in self.queues]  # G x (Q / world x K)
            if self.current_epoch >= h.queue_start_epoch:  # epoch_queue_starts: filled from then on
                for q, z_g in zip(self.queues, z[:n_global], strict=True):
                    q.push(z_g.detach())  # the embeddings of every process, rank order
        loss = swav_loss(scores[:n_global], scores[n_global:], h.temperature, h.sinkhorn_iterations, h.epsilon,
                         queue_scores=queue_scores)
        return loss
