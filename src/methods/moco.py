"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020): momentum key encoder and a queue of negatives.

v1 and v2 are two configs of this class: v1 has a linear head and temperature 0.07, v2 an MLP head (Linear-ReLU-
Linear, biases, no BatchNorm: the reference's ``mlp`` hack), temperature 0.2 and stronger augmentation (blur).
Shuffled BatchNorm (sec. 3.3): the key batch is permuted (across processes under DDP) before the key encoder, whose
BatchNorm normalises per process and per group (:class:`src.nn.ema.SplitBatchNorm`: ``bn_splits`` groups, by
default 8 on one process as the reference's 8 GPUs and its one-GPU demo, 1 per process under DDP, never
synchronised), then unpermuted: a query and its positive key are normalised with statistics of different images.
The keys of all processes are enqueued.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy, split_batchnorm
from src.nn.heads import MLP
from src.nn.losses import info_nce
from src.nn.queue import FeatureQueue, queue_size_problems
from src.utils import distributed as du
from src.utils.errors import UserError


class MoCo(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 0.2, queue_size: int = 65536,
                 proj_hidden_dim: int = 2048, proj_dim: int = 128, mlp_head: bool = True,
                 momentum: float = 0.999, shuffle_bn: bool = True, bn_splits: int | None = None, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, **kwargs)
        if temperature <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        if bn_splits is not None and bn_splits < 1:
            raise UserError(f"method.bn_splits={bn_splits} must be >= 1 or null (8 on one process, 1 under DDP)")
        self.temperature, self.shuffle_bn = temperature, shuffle_bn
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=2 if mlp_head else 1,
                             batch_norm=False)
        self.backbone_k, self.projector_k = frozen_copy(self.backbone), frozen_copy(self.projector)
        if shuffle_bn:
            split_batchnorm(self.backbone_k, bn_splits)
            split_batchnorm(self.projector_k, bn_splits)
        self.queue = FeatureQueue(queue_size, proj_dim)  # K x C negatives

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        return (super().config_problems(cfg, global_batch, num_views)
                + queue_size_problems(cfg.method, global_batch, default=65536))

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_k), (self.projector, self.projector_k)]

    def param_groups(self):
        """One group: the reference's SGD decays every parameter, biases and BatchNorm included (main_moco.py)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """Normalised keys (N x C) of the key views, with shuffled BatchNorm."""
        if self.shuffle_bn:
            x_k, undo = du.batch_shuffle(x_k)  # this process's slice of the permuted global batch
        k = self.projector_k(self.backbone_k(x_k))  # N x C
        if self.shuffle_bn:
            k = du.batch_unshuffle(k, undo)
        return F.normalize(k.float(), dim=1)

    def training_loss(self, views):
        x_q, x_k = views[:2]
        q = self.embed([x_q], head=self.projector)[0]  # N x C (embed keeps the query view's features for the probe)
        k = self.keys(x_k)  # N x C
        loss = info_nce(q.float(), k, self.queue.features.clone(), self.temperature)
        self.queue.push(k)  # the keys of all processes, rank order
        return loss
