"""MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): mask most patches at random,
encode only the visible ones, reconstruct the pixels of the masked ones with a light decoder.

    keep, mask, restore = random_masking(B, L, mask_ratio)        # sort uniform noise per sample (sec. 3)
    latent = encoder(tokens(x), keep)                              # ViT on [CLS] + the ~25% visible patches
    pred   = decoder(latent, restore)                              # mask tokens, sin-cos positions, few blocks
    loss   = mean over masked patches of ||pred - target||^2       # target: the patch's pixels, per-patch
                                                                   # normalised with norm_pix_loss (Table 1d)

The representation is the encoder (``forward``: the ViT's pooled features of the whole image). As models_mae.py,
the encoder (unless it was loaded from a weights file) has fixed 2-D sin-cos positions (``sincos_pos_embed``) and
starts from MAE's initialisation: linears Xavier-uniform with zero biases, the patch projection Xavier-uniform as a
D x (C p^2) matrix, LayerNorms at 1 / 0, the CLS token N(0, 0.02).
"""

from __future__ import annotations

import torch
from torch import nn

from src.methods.pretext_base import PretextTask, mask_ratio_problems
from src.nn.mae_decoder import MAEDecoder
from src.nn.masks import random_masking
from src.nn.tokens import sincos_2d


@torch.no_grad()
def fixed_sincos_positions(vit: nn.Module) -> None:
    """The ViT's position embedding set to 2-D sin-cos (the CLS position 0) and frozen, as ``pos_embed=sincos``."""
    pos = vit.net.pos_embed
    pos.zero_()
    pos[0, 1:] = sincos_2d(vit.base_grid, pos.shape[-1])
    pos.requires_grad_(False)


@torch.no_grad()
def mae_vit_init(vit: nn.Module) -> None:
    """models_mae.py's ``initialize_weights`` on our ViT (its timm net)."""
    net = vit.net
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    w = net.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like nn.Linear, not nn.Conv2d
    if net.patch_embed.proj.bias is not None:
        nn.init.zeros_(net.patch_embed.proj.bias)
    nn.init.normal_(net.cls_token, std=0.02)


class MAE(PretextTask):
    needs_tokens = True

    def __init__(self, backbone, views, optimizer, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 sincos_pos_embed: bool = True, mae_init: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if not getattr(backbone, "pretrained", None):  # never over a weights file
            if mae_init:
                mae_vit_init(backbone)
            if sincos_pos_embed:
                fixed_sincos_positions(backbone)
        channels, p = views.mean.numel(), backbone.patch_size
        self.decoder = MAEDecoder(backbone.out_dim, p * p * channels, decoder_dim, decoder_depth, decoder_heads)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel targets (B x L x p*p*C), normalised per patch with ``norm_pix_loss``."""
        t = self.backbone.patchify(x)
        if self.hparams.norm_pix_loss:
            t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return t

    def reconstruct(self, x: torch.Tensor):
        """(masking, predicted pixels B x L x p*p*C) for normalised images ``x``."""
        grid = self.backbone.grid(x)
        masking = random_masking(x.shape[0], grid[0] * grid[1], self.hparams.mask_ratio, x.device)
        latent = self.backbone.encode(self.backbone.tokens(x), masking.keep)  # B x 1+K x D
        return masking, self.decoder(latent, masking.restore, grid)

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S, normalised
        masking, pred = self.reconstruct(x)
        per_patch = ((pred.float() - self.target(x)) ** 2).mean(dim=-1)  # B x L
        return (per_patch * masking.mask).sum() / masking.mask.sum()  # masked patches only

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.fixed_randomness(x):  # the same masks at every epoch
            masking, pred = self.reconstruct(x)
        pixels = self.backbone.patchify(x)
        pred = pred.float()
        if self.hparams.norm_pix_loss:  # back to pixels with each patch's own mean and spread (as MAE's figures)
            pred = pred * (pixels.var(dim=-1, keepdim=True) + 1e-6).sqrt() + pixels.mean(dim=-1, keepdim=True)
        hidden = masking.mask.unsqueeze(-1)
        grid, channels = self.backbone.grid(x), x.shape[1]
        masked = self.backbone.unpatchify(pixels.masked_fill(hidden, 0.0), grid, channels)  # 0 = the data mean
        filled = self.backbone.unpatchify(torch.where(hidden, pred, pixels), grid, channels)
        return {"input": self.rgb(x), "masked": self.rgb(masked), "reconstruction": self.rgb(filled)}

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        return problems + mask_ratio_problems(cfg.method.get("mask_ratio", 0.75))
