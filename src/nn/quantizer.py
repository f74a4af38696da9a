"""Vector quantisation with an exponential-moving-average codebook (van den Oord et al. 2017, "Neural Discrete
Representation Learning", sec. 3.2 and appendix A.1; the EMA update as Razavi et al. 2019 use it).

Every position of an encoder map z_e (B x C x h x w) takes the nearest of K codes (squared Euclidean distance);
the straight-through estimator copies the decoder's gradient to z_e. In training the codebook follows its
assignments instead of a gradient:

    N_k <- g N_k + (1 - g) n_k                 n_k: vectors assigned to code k in this (global) batch
    m_k <- g m_k + (1 - g) sum_{z -> k} z      e_k = m_k / N~_k  (N~: Laplace-smoothed counts)

Codes whose count N_k falls below ``restart_threshold`` (vectors per batch, on average) are restarted on random
encoder outputs of the batch (as Jukebox does against codebook collapse), with N_k set to max(threshold, 1) and
m_k to that many copies of the new code: a restarted code that then takes at least ``restart_threshold`` vectors a
batch stays alive (set to 1 under a threshold of 2, it would be drawn again at every step, used or not). The codebook starts from the first batch's encoder outputs. Counts and sums
are reduced over all processes and restarts are drawn identically on every rank, so every rank keeps the same
codebook. The state lives in buffers: it checkpoints, and a skipped step restores it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.utils import distributed as du


class Quantized(NamedTuple):
    z_q: Tensor  # B x C x h x w, the codes (straight-through: gradients pass to the encoder output)
    ids: Tensor  # B x h x w long, the code of each position
    commitment: Tensor  # mean ||z_e - sg(z_q)||^2 per channel
    perplexity: Tensor  # exp(entropy) of the batch's code usage, in [1, K]
    usage: Tensor  # K: how many positions took each code (of the global batch in training, else this one)


def nearest_codes(z: Tensor, codebook: Tensor) -> Tensor:
    """(N,) index of the nearest row of ``codebook`` (K x C) for each row of ``z`` (N x C), squared L2."""
    dist = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.t() + codebook.pow(2).sum(1).unsqueeze(0)  # N x K
    return dist.argmin(dim=1)


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, restart_threshold: float = 1.0):
        super().__init__()
        if num_codes < 2 or not 0 < decay < 1:
            raise ValueError(f"VectorQuantizer: num_codes={num_codes} must be >= 2 and decay={decay} in (0, 1)")
        self.num_codes, self.decay, self.eps, self.restart_threshold = num_codes, decay, eps, restart_threshold
        self.register_buffer("codebook", torch.randn(num_codes, dim))  # K x C
        self.register_buffer("counts", torch.ones(num_codes))  # N_k
        self.register_buffer("sums", self.codebook.clone())  # m_k
        self.register_buffer("initialised", torch.tensor(False))
        self._initialised = False  # a Python copy of the flag: no device sync once it is set

    def forward(self, z: Tensor) -> Quantized:
        B, C, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, C)  # N x C
        if self.training:
            self._initialise(flat.detach())
        ids = nearest_codes(flat.detach(), self.codebook)  # N
        ones = torch.ones_like(ids, dtype=torch.float)
        usage = torch.zeros(self.num_codes, device=z.device).index_add_(0, ids, ones)  # K, this process
        if self.training:  # every rank trains: the global counts; in eval (BEiT's tokens, pictures on rank 0) local
            usage = du.all_reduce_sum(usage)
            self._update(flat.detach(), ids, usage)
        z_q = self.codebook[ids].reshape(B, h, w, C).permute(0, 3, 1, 2).to(z.dtype)  # B x C x h x w
        commitment = F.mse_loss(z, z_q.detach())
        probs = usage / usage.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return Quantized(z + (z_q - z).detach(), ids.reshape(B, h, w), commitment, perplexity, usage)

    @torch.no_grad()
    def _initialise(self, flat: Tensor) -> None:
        if self._initialised or bool(self.initialised):  # the buffer is read until it is set (and after a resume)
            self._initialised = True
            return
        chosen = self._draw(flat, self.num_codes)
        self.codebook.copy_(chosen)
        self.sums.copy_(chosen)
        self.counts.fill_(1.0)
        self.initialised.fill_(True)
        self._initialised = True

    @torch.no_grad()
    def _draw(self, flat: Tensor, n: int) -> Tensor:
        """``n`` random rows of the global batch's encoder outputs, the same rows on every rank."""
        pool = du.gather(flat)  # world*N x C
        idx = du.broadcast(torch.randint(0, pool.shape[0], (n,), device=pool.device))
        return pool[idx]

    @torch.no_grad()
    def _update(self, flat: Tensor, ids: Tensor, n: Tensor) -> None:
        s = du.all_reduce_sum(torch.zeros_like(self.sums).index_add_(0, ids, flat))  # K x C: sum of the assigned z
        self.counts.mul_(self.decay).add_(n, alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(s, alpha=1 - self.decay)
        total = self.counts.sum()
        smoothed = (self.counts + self.eps) / (total + self.num_codes * self.eps) * total  # Laplace smoothing
        self.codebook.copy_(self.sums / smoothed.unsqueeze(1))
        dead = (self.counts < self.restart_threshold).unsqueeze(1)  # K x 1, no host sync: every code gets a candidate
        fresh = self._draw(flat, self.num_codes)
        restart = max(self.restart_threshold, 1.0)  # the count a restarted code starts from (codebook = sums / count)
        self.codebook.copy_(torch.where(dead, fresh, self.codebook))
        self.sums.copy_(torch.where(dead, fresh * restart, self.sums))
        self.counts.copy_(torch.where(dead.squeeze(1), torch.full_like(self.counts, restart), self.counts))
