"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles"): which of P permutations shuffled the 3x3 tiles of an image?

The tiles (with a gap and a random jitter, each normalised on its own, sec. 3.3) are shuffled by one of P
permutations of maximal Hamming distance (sec. 3.2) chosen uniformly per image; the shared tile encoder (the
backbone, one batched pass over all B x 9 tiles) embeds them, the features are concatenated in the shuffled
order and an MLP classifies the permutation into P classes. The permutation set is a persistent buffer
(saved in every checkpoint) and is written to ``<run dir>/jigsaw_permutations.txt`` when training starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from src.methods.pretext_base import PretextTask, correct_fraction
from src.methods.relative_patch import GRID, check_gap, grid_problems
from src.nn.heads import MLP
from src.nn.patches import PERMUTATION_RULES, grid_patches, hamming_permutations, normalize_patches, permute
from src.utils.errors import UserError

TILES = GRID * GRID


def permutations_problem(num: int) -> str | None:
    if not 2 <= num <= math.factorial(TILES):
        return (f"method.num_permutations={num} must be in [2, {math.factorial(TILES)}] (the {TILES}! orders of "
                f"{TILES} tiles); the paper uses 1000")
    return None


class Jigsaw(PretextTask):
    min_global_batch = 2  # the MLP head's BatchNorm needs two images

    def __init__(self, backbone, views, optimizer, num_permutations: int = 1000, permutation_seed: int = 0,
                 gap: int = 2, jitter: int = 1, head_hidden_dim: int = 1024, head_layers: int = 2,
                 permutation_rule: str = "mean", **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        check_gap(gap, jitter)
        if permutation_rule not in PERMUTATION_RULES:
            raise UserError(f"method.permutation_rule={permutation_rule!r}; allowed: {', '.join(PERMUTATION_RULES)} "
                            "(mean: the paper's Algorithm 1)")
        if problem := permutations_problem(num_permutations):
            raise UserError(problem)
        if head_layers < 1:
            raise UserError(f"method.head_layers={head_layers} must be >= 1 (1: a linear classifier)")
        self.gap, self.jitter = gap, jitter
        self.register_buffer("permutations", hamming_permutations(num_permutations, TILES, permutation_seed,
                                                                        permutation_rule))  # P x 9
        self.head = MLP(TILES * backbone.out_dim, head_hidden_dim, num_permutations, num_layers=head_layers)

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S
        B = x.shape[0]
        tiles, _ = grid_patches(x, GRID, self.gap, self.jitter)  # B x 9 x C x p x p
        tiles = normalize_patches(tiles)
        label = torch.randint(len(self.permutations), (B,), device=x.device)  # which permutation
        tiles = permute(tiles, self.permutations[label])  # B x 9 x C x p x p, shuffled
        features = self.online(tiles.flatten(0, 1)).view(B, -1)  # B x 9D, in the shuffled order
        logits = self.head(features)  # B x P
        return F.cross_entropy(logits, label), {"pretext_acc": correct_fraction(logits.detach(), label)}

    def on_fit_start(self) -> None:
        """Rank 0 writes the permutation set, one per line, to ``<default_root_dir>/jigsaw_permutations.txt``.
        A Trainer given no default_root_dir falls back to the working directory, which is left alone."""
        root = self.trainer.default_root_dir
        if not self.trainer.is_global_zero or not root or os.path.abspath(root) == os.getcwd():
            return
        path = Path(root) / "jigsaw_permutations.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(" ".join(map(str, p)) + "\n" for p in self.permutations.tolist()))

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views) + grid_problems(cls, cfg)
        bad_set = permutations_problem(cfg.method.get("num_permutations", 1000))
        return problems + ([bad_set] if bad_set else [])
