"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020): momentum key encoder and a queue of negatives.

v1 and v2 are two configs of this class: v1 has a linear head and temperature 0.07, v2 an MLP head,
temperature 0.2 and stronger augmentation (blur). Keys are encoded with shuffled BatchNorm across
processes and the keys of all processes are enqueued.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import MLP
from src.nn.losses import info_nce
from src.utils import distributed as du
from src.utils.errors import UserError


class MoCo(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 0.2, queue_size: int = 65536,
                 proj_hidden_dim: int = 2048, proj_dim: int = 128, mlp_head: bool = True,
                 momentum: float = 0.999, shuffle_bn: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, **kwargs)
        if temperature <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        if queue_size < 1:
            raise UserError(f"method.queue_size={queue_size} must be >= 1")
        self.temperature, self.shuffle_bn = temperature, shuffle_bn
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=2 if mlp_head else 1)
        self.backbone_k, self.projector_k = frozen_copy(self.backbone), frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # K x C
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def config_problems(cls, method_cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(method_cfg, global_batch, num_views)
        k = method_cfg.get("queue_size", 65536)
        if isinstance(k, int) and k > 0 and k % global_batch:
            problems.append(f"method.queue_size={k} must be a multiple of the global batch {global_batch} "
                            f"(data.batch_size x devices); e.g. method.queue_size={max(k // global_batch, 1) * global_batch}")
        return problems

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_k), (self.projector, self.projector_k)]

    def training_loss(self, views):
        x_q, x_k = views[:2]
        q = self.projector(self.forward(x_q))  # N x C
        with torch.no_grad():
            if self.shuffle_bn:
                x_k, undo = du.batch_shuffle(x_k)
            k = self.projector_k(self.backbone_k(x_k))  # N x C
            if self.shuffle_bn:
                k = du.batch_unshuffle(k, undo)
            k = F.normalize(k.float(), dim=1)
        loss = info_nce(q.float(), k, self.queue.clone(), self.temperature)
        self.enqueue(k)
        return loss

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the keys of all processes (rank order) over the oldest entries of the queue."""
        keys = du.gather(keys)  # (world * N) x C
        n, size = keys.shape[0], self.queue.shape[0]
        assert size % n == 0, f"queue_size {size} must be a multiple of the global batch {n}"  # for simplicity
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + n] = keys
        self.queue_ptr.fill_((ptr + n) % size)
