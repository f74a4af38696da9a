"""Explicit distributed helpers, correct at world size 1 (then they are identities).

Lightning's ``self.all_gather`` adds a world dimension only when there are several processes; these
helpers always return a flat ``(world * B, ...)`` tensor so callers never special-case one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice.

    With DDP averaging parameter gradients over ranks, this makes the gradient of a loss computed on
    gathered tensors equal to the gradient of the global loss (the mean of the per-rank losses).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), rank order; gradients flow back to every rank's own slice."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), rank order, no gradient (e.g. MoCo keys for the queue)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffled BatchNorm: permute the global batch across ranks; returns (local slice, undo index).

    At world size 1 the batch is permuted too: MoCo's key encoder then normalises groups of it
    (:class:`src.nn.ema.SplitBatchNorm`), so a key is normalised with other images than its query.
    """
    if not is_distributed():
        perm = torch.randperm(x.shape[0], device=x.device)
        return x[perm], torch.argsort(perm)
    local = x.shape[0]
    x_all = gather(x)  # (world * B, ...)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    undo = torch.argsort(perm)
    mine = perm.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine], undo


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, undo: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`batch_shuffle` for the encoded local slice."""
    if not is_distributed():
        return x[undo]
    local = x.shape[0]
    x_all = gather(x)
    mine = undo.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine]


@torch.no_grad()
def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return x
    out = x.clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes, as a new tensor (``x`` itself at world size 1); no gradient."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``x`` over all processes, as a new tensor (``x`` itself at world size 1); no gradient."""
    return _all_reduce(x, dist.ReduceOp.MAX)


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` of rank ``src`` on every process (in place; ``x`` itself at world size 1)."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x
