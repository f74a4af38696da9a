"""A FIFO of feature vectors held in buffers (MoCo's negatives, NNCLR's support set), so it
checkpoints, moves with the module and resumes exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.utils import distributed as du


class FeatureQueue(nn.Module):
    """``size`` x ``dim`` features, initialised to random unit vectors; ``push`` writes the rows of every
    process (rank order) over the oldest ones. ``filled`` counts rows written so far (capped at size).

    ``ptr`` and ``filled`` are buffers (they checkpoint), mirrored on the host: they are read from the device once
    (after construction or loading a checkpoint) and then followed on the host, so a training step never waits for
    the device to learn where to write."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"a feature queue needs at least one entry, got size {size}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))  # K x D
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self._host: tuple[int, int] | None = None  # (ptr, filled), None: read the buffers at the next use

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.buffers_restored()

    def buffers_restored(self) -> None:
        """The buffers were written from outside (a checkpoint, a skipped step): read them again at the next use."""
        self._host = None

    def _position(self) -> tuple[int, int]:
        if self._host is None:
            self._host = (int(self.ptr), int(self.filled))
        return self._host

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def written(self) -> torch.Tensor:
        """The rows written so far (all rows once the queue has wrapped)."""
        return self.features[: self._position()[1]]

    def is_full(self) -> bool:
        return self._position()[1] == self.size

    @torch.no_grad()
    def push(self, x: torch.Tensor, gather: bool = True) -> None:
        """Write ``x`` (N x D), with the rows of every process when ``gather`` (else this process's only)."""
        x = du.gather(x) if gather else x  # (world * N) x D
        n = x.shape[0]
        assert self.size % n == 0, f"queue size {self.size} must be a multiple of the global batch {n}"  # for simplicity
        ptr, filled = self._position()
        self.features[ptr : ptr + n] = x.to(self.features.dtype)
        self._host = ((ptr + n) % self.size, min(filled + n, self.size))
        self.ptr.fill_(self._host[0])
        self.filled.fill_(self._host[1])


def queue_size_problems(method_cfg, global_batch: int, default: int, allow_zero: bool = False) -> list[str]:
    """The config rules of every queue: at least one entry (or 0 = off where allowed) and a multiple of
    the global batch."""
    k = method_cfg.get("queue_size", default)
    smallest = 0 if allow_zero else 1
    if isinstance(k, bool) or not isinstance(k, int) or k < smallest:
        return [f"method.queue_size={k} must be an integer >= {smallest}" + (" (0 turns the queue off)" if allow_zero else "")]
    if k > 0 and k % global_batch:
        return [f"method.queue_size={k} must be a multiple of the global batch {global_batch} "
                f"(data.batch_size x devices); e.g. method.queue_size={max(k // global_batch, 1) * global_batch}"]
    return []
