"""VQ-VAE (van den Oord et al. 2017): a discrete visual tokenizer, trained here so that BEiT has visual tokens
on machines that cannot download DALL-E's. ``python -m src.train method=vqvae`` trains it like any run;
``method=beit method.tokenizer=<run>/checkpoints/last.ckpt`` reads it.

    z_e = proj(backbone.feature_map(x))            # B x code_dim x h x w: one vector per image patch
    z_q, ids = quantize(z_e)                        # nearest of num_codes codes; EMA codebook (src/nn/quantizer.py)
    x_hat = decoder(z_q)                            # upsampling decoder back to the image
    loss = ||x_hat - x||^2 + beta ||z_e - sg(z_q)||^2      (Eq. 3; the codebook term is replaced by the EMA)

The token grid is the backbone's feature map: its stride must equal the ViT's patch size (the convnet of depth
3 has stride 4, the ViT patch size of 28 and 32 px crops), which BEiT checks. The backbone is what evaluation
measures, as for the other pretext tasks. Logged: reconstruction and commitment terms, the codebook's
perplexity (effective number of codes in use) and the share of codes used in the batch; pictures show input,
reconstruction and decoded codes (each tiled over the grid), from the most used one down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.pretext_base import PretextTask
from src.nn.decoders import ImageDecoder, feature_channels, feature_map_size, needs_feature_map
from src.nn.quantizer import VectorQuantizer
from src.utils.errors import UserError


class VQVAE(PretextTask):
    def __init__(self, backbone, views, optimizer, num_codes: int = 1024, code_dim: int = 64, commitment: float = 0.25,
                 ema_decay: float = 0.99, restart_threshold: float = 1.0, decoder_min_width: int = 32, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        needs_feature_map(backbone, type(self).__name__)
        size, channels = views.groups[0]["size"], views.mean.numel()
        side = feature_map_size(backbone, channels, size)
        if size % side:
            raise UserError(f"VQVAE: the backbone maps {size} px crops to a {side}x{side} grid, not a whole number of "
                            "pixels per token; use a crop size that is a multiple of its stride")
        self.stride, self.channels = size // side, channels
        self.proj = nn.Conv2d(feature_channels(backbone), code_dim, 1)
        self.quantizer = VectorQuantizer(num_codes, code_dim, ema_decay, restart_threshold=restart_threshold)
        self.decoder = ImageDecoder(code_dim, channels, side, size, decoder_min_width)

    # ---- the tokenizer API (BEiT) -----------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone.feature_map(x))  # B x code_dim x h x w

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B x h*w long, row-major) of normalised images ``x``."""
        return self.quantizer(self.encode(x)).ids.flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Normalised images from tokens (B x h*w) on an h x w grid."""
        codes = self.quantizer.codebook[ids].reshape(ids.shape[0], *grid, -1).permute(0, 3, 1, 2)
        return self.decoder(codes, size=grid[0] * self.stride)

    def tokenizer_info(self) -> dict:
        """What BEiT checks before it trains (saved in every checkpoint as ``checkpoint['tokenizer']``)."""
        return {"stride": self.stride, "channels": self.channels, "num_codes": self.num_codes}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["tokenizer"] = self.tokenizer_info()

    # ---- training -------------------------------------------------------------------------------
    def reconstruct(self, x: torch.Tensor):
        q = self.quantizer(self.encode(x))
        return q, self.decoder(q.z_q, size=x.shape[-1])

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S, normalised
        q, x_hat = self.reconstruct(x)
        rec = F.mse_loss(x_hat.float(), x)
        return rec + self.hparams.commitment * q.commitment, {
            "reconstruction": rec.detach(), "commitment": q.commitment.detach(), "perplexity": q.perplexity,
            "codes_used": (q.usage > 0).float().mean()}

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q, x_hat = self.reconstruct(x)
        order = q.usage.argsort(descending=True)[: int((q.usage > 0).sum())]  # codes these images use, most used first
        top = order[torch.linspace(0, len(order) - 1, x.shape[0], device=x.device).round().long()]  # spread over ranks
        side = x.shape[-1] // self.stride
        codes = self.decode(top.view(-1, 1).expand(-1, side * side), (side, side))  # each code tiled over the grid
        return {"input": self.rgb(x), "reconstruction": self.rgb(x_hat.float()), "codes": self.rgb(codes)}
