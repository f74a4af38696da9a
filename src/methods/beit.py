"""BEiT (Bao et al. 2021, "BERT Pre-Training of Image Transformers"): masked image modelling on visual tokens.

    ids  = tokenizer(x)                                   # B x L visual tokens (frozen; ours: a VQ-VAE run)
    mask = blockwise_masking(B, grid, ratio 0.4)          # Algorithm 1: rectangles of >= 16/196 of the grid
    h    = ViT(tokens(x) with masked patches -> mask token)
    loss = cross-entropy(head(h[mask]), ids[mask])        # predict the visual token of every masked patch

The tokenizer is a checkpoint of ``method=vqvae`` (DALL-E's dVAE cannot be downloaded here): its token grid must
be the ViT's patch grid (same stride as the patch size) and it must read the same number of channels. It stays
frozen and in eval mode; its weights are part of BEiT's checkpoint. Not in this implementation: the paper's
relative position bias and shared-layer initialisation details (the ViT is timm's, with LayerScale as an option:
``backbone.init_values=0.1``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.pretext_base import PretextTask, correct_fraction, mask_ratio_problems
from src.nn.masks import block_masks
from src.utils.checkpointing import load_checkpoint, model_from_checkpoint
from src.utils.errors import UserError

TRAIN_ONE = ("train one with `python -m src.train method=vqvae` (same data) and pass "
             "method.tokenizer=<its run>/checkpoints/last.ckpt")


def read_tokenizer_checkpoint(path: str) -> dict:
    """The checkpoint of a ``method=vqvae`` run, loaded safely; one clear line when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"method.tokenizer={path} is not a file; {TRAIN_ONE}")
    try:
        state = load_checkpoint(p)  # safely, with one line for a file that is not a checkpoint of this framework
    except UserError as e:
        raise UserError(f"method.tokenizer={e}; {TRAIN_ONE}") from e
    if "tokenizer" not in state or "config" not in state:
        raise UserError(f"method.tokenizer={path} is not a tokenizer checkpoint (no visual-token codebook in it); "
                        f"{TRAIN_ONE}")
    return state


def load_tokenizer(path: str) -> nn.Module:
    """The frozen VQ-VAE of a ``method=vqvae`` checkpoint, rebuilt from the run config saved in it."""
    tokenizer = model_from_checkpoint(read_tokenizer_checkpoint(path))
    tokenizer.requires_grad_(False)
    return tokenizer


def tokenizer_problems(path, patch_size, channels) -> list[str]:
    """Pre-flight: a missing tokenizer, a file that is not one, or one of another grid or channel count."""
    if not path:
        return [f"method=beit needs a visual tokenizer: {TRAIN_ONE}"]
    try:
        info = read_tokenizer_checkpoint(str(path))["tokenizer"]
    except UserError as e:
        return [str(e)]
    problems = []
    if isinstance(patch_size, int) and info["stride"] != patch_size:
        problems.append(f"method.tokenizer={path} makes one token per {info['stride']}x{info['stride']} px but the ViT's "
                        f"patches are {patch_size}x{patch_size} (backbone.patch_size={patch_size}): the token grid must "
                        "be the patch grid; train the tokenizer with a backbone of that stride or change the patch size")
    if isinstance(channels, int) and info["channels"] != channels:
        problems.append(f"method.tokenizer={path} reads {info['channels']}-channel images but data.channels={channels}; "
                        "train the tokenizer on this data")
    return problems


class BEiT(PretextTask):
    needs_tokens = True

    def __init__(self, backbone, views, optimizer, tokenizer: str | None = None, mask_ratio: float = 0.4,
                 min_block: int | None = None, min_aspect: float = 0.3, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        for problem in tokenizer_problems(tokenizer, backbone.patch_size, views.mean.numel()):
            raise UserError(problem)
        self.tokenizer = load_tokenizer(tokenizer)
        self.mask_token = nn.Parameter(torch.zeros(backbone.out_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(backbone.out_dim, self.tokenizer.num_codes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen: its BatchNorm statistics never move
        return self

    def visual_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B x L) of normalised views ``x``, renormalised the way the tokenizer was trained."""
        rgb = self.views.denormalize(x)
        return self.tokenizer.tokenize(self.tokenizer.views._normalize(rgb))

    def predict(self, x: torch.Tensor):
        """(mask B x L, logits B x L x K) for normalised images ``x``."""
        grid = self.backbone.grid(x)
        h = self.hparams
        mask = block_masks(x.shape[0], grid, h.mask_ratio, h.min_block, h.min_aspect, x.device)  # B x L
        out = self.backbone.encode(self.backbone.tokens(x, mask, self.mask_token))[:, 1:]  # B x L x D
        return mask, self.head(out)

    def training_loss(self, views):
        x = self.images(views)
        ids = self.visual_tokens(x)  # B x L
        mask, logits = self.predict(x)
        logits, target = logits[mask].float(), ids[mask]  # M x K, M
        return F.cross_entropy(logits, target), {"pretext_acc": correct_fraction(logits.detach(), target)}

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        grid = self.backbone.grid(x)
        with self.fixed_randomness(x):  # the same masks at every epoch
            mask, logits = self.predict(x)
        ids = self.visual_tokens(x)
        predicted = torch.where(mask, logits.argmax(dim=-1), ids)
        p = self.backbone.patch_size
        hidden = mask.view(-1, 1, *grid).repeat_interleave(p, 2).repeat_interleave(p, 3)  # B x 1 x H x W
        decoded = lambda t: self.tokenizer.views.denormalize(self.tokenizer.decode(t, grid).float()).clamp(0, 1)  # noqa: E731
        return {"input": self.rgb(x), "masked": self.rgb(x.masked_fill(hidden, 0.0)), "tokens": decoded(ids),
                "prediction": decoded(predicted)}

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        problems += mask_ratio_problems(cfg.method.get("mask_ratio", 0.4))
        if problems:
            return problems
        return tokenizer_problems(cfg.method.get("tokenizer"), cfg.backbone.get("patch_size"), cfg.data.get("channels"))
