"""MAE's light decoder (He et al. 2021, sec. 3 "MAE decoder"): the encoded visible tokens, projected to the
decoder width, are completed with a shared learned mask token at the masked positions, un-shuffled to the
image order, given fixed 2-D sine-cosine position embeddings, and run through a few Transformer blocks; a
linear layer predicts the p x p x C pixels of every patch. As models_mae.py: LayerNorm epsilon 1e-6, linears
Xavier-uniform with zero biases, the mask token N(0, 0.02)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from src.nn.tokens import sincos_2d


class MAEDecoder(nn.Module):
    def __init__(self, encoder_dim: int, patch_pixels: int, dim: int = 512, depth: int = 8, num_heads: int = 16,
                 mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.vision_transformer import Block

        if dim % num_heads or dim % 4:
            raise ValueError(f"method.decoder_dim={dim} must be a multiple of method.decoder_heads={num_heads} and of 4")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        self.dim = dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: Tensor, restore: Tensor, grid: tuple[int, int]) -> Tensor:
        """Pixels of every patch (B, L, p*p*C), image order, from the encoder output ``latent`` (B, 1 + K, D:
        CLS then the visible tokens in masking order) and ``restore`` (B, L) of the masking."""
        x = self.embed(latent)  # B x 1+K x d
        B, L = restore.shape
        masked = self.mask_token.to(x.dtype).expand(B, L - (x.shape[1] - 1), -1)  # B x L-K x d
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [visible..., masked...]
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, self.dim))  # B x L x d, image order
        pos = sincos_2d(grid, self.dim).to(x.device, x.dtype).unsqueeze(0)  # 1 x L x d (the CLS position: 0)
        x = torch.cat([x[:, :1], patches + pos], dim=1)
        return self.pred(self.norm(self.blocks(x)))[:, 1:]  # B x L x p*p*C
