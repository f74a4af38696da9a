"""The pre-training order: reproducible per epoch and resumable mid-epoch.

:class:`EpochSampler` shuffles from ``(seed, epoch)`` alone, not from the global RNG, so a resumed run
sees the same order as an uninterrupted one; under DDP it gives each rank its own slice of the same
permutation (Lightning's sampler replacement is off: ``use_distributed_sampler=False`` in train.py).
On a mid-epoch resume, :class:`src.callbacks.resume.DataPosition` tells it how many samples of the epoch
to skip (without loading them). :class:`DeviceLoader` cuts the same batches from tensors that live on the
training device (``data.on_device=true``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from src.utils.hashing import stable_hash


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The seed of one training batch's randomness (views, MoCo's shuffle, pretext labels) from (run seed, rank,
    epoch, index of the batch in its epoch) alone: a resumed run draws what an uninterrupted one would, every rank
    draws differently."""
    return stable_hash(seed, rank, epoch, index) % 2**63


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of an epoch's order: a function of (seed, epoch) alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from ``seed`` and the epoch (``set_epoch``, which Lightning
    calls every epoch), truncated to a multiple of the world size and split round-robin between ranks."""

    def __init__(self, n: int, seed: int = 0, on_epoch: Callable[[int], None] | None = None):
        self.n, self.seed, self.epoch = n, seed, 0
        self.on_epoch = on_epoch  # e.g. a caption dataset's set_epoch: which caption each image shows
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank to skip), used once

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def skip_once(self, epoch: int, samples: int) -> None:
        """The next pass over ``epoch`` starts ``samples`` samples (of this rank) in."""
        self._resume = (epoch, samples)

    def _permutation(self) -> Tensor:
        order = torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
        rank, world = _rank_world()
        return order[: self.n - self.n % world][rank::world]

    def indices(self) -> list[int]:
        """This rank's indices of the whole current epoch."""
        return self._permutation().tolist()

    def order(self) -> Tensor:
        """This rank's indices of the current epoch as a pass over it sees them: a resumed epoch from its first
        unseen sample on (the skip is used once)."""
        idx = self._permutation()
        if self._resume is not None:
            epoch, skip = self._resume
            if epoch == self.epoch:
                idx = idx[skip:]
            if epoch <= self.epoch:  # an earlier epoch: Lightning's set-up pass before set_epoch; keep waiting
                self._resume = None
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.n // _rank_world()[1]


def epoch_loader(dataset, batch_size: int, seed: int, on_epoch: Callable[[int], None] | None = None,
                 **kwargs) -> DataLoader:
    """A ``DataLoader`` over an :class:`EpochSampler`. It gets its own generator: creating an iterator draws a
    worker base seed, which must not come from (and shift) the global RNG the views use, or a resumed run
    would draw other views than an uninterrupted one."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, on_epoch),
                      generator=torch.Generator().manual_seed(seed % 2**63), **kwargs)


class DeviceLoader:
    """Training batches cut from tensors that live on the training device (``data.on_device=true``): the epoch's
    order and resume skip come from an :class:`EpochSampler` as with :func:`epoch_loader` (the same batches, bit for
    bit), the order is copied to the device once per epoch and each batch is an ``index_select`` there. No workers,
    no copies and no host work per batch. The last partial batch is dropped. ``sampler`` and ``batch_size`` are
    what Lightning (``set_epoch``) and :class:`src.callbacks.resume.DataPosition` use."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, seed: int):
        self.tensors, self.batch_size = tensors, batch_size
        self.sampler = EpochSampler(len(tensors[0]), seed)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[Tensor]]:
        idx = self.sampler.order().to(self.tensors[0].device)
        for start in range(0, len(idx) - self.batch_size + 1, self.batch_size):
            batch = idx[start:start + self.batch_size]
            yield [t.index_select(0, batch) for t in self.tensors]
