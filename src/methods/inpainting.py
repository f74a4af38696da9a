"""Context Encoders (Pathak et al. 2016): reconstruct a masked region of the image from its context.

The hole (a central square or random blocks) is filled with 0 in normalised space (the dataset mean), the
encoder is the backbone's feature map, a decoder upsamples it back to the image, and the loss is the L2
reconstruction on the hole (paper Eq. 2), its ``overlap``-px border, still seen by the encoder, weighted
``overlap_weight`` times. The paper's adversarial loss is not used.
"""

from __future__ import annotations

import torch

from src.methods.pretext_base import PretextTask, crop_size
from src.nn.decoders import ImageDecoder, feature_channels, feature_map_size, needs_feature_map
from src.nn.masks import center_mask, overlap_weights, random_block_masks, shrink
from src.utils.errors import UserError

MASKS = ("center", "random")


class Inpainting(PretextTask):
    def __init__(self, backbone, views, optimizer, mask: str = "center", mask_frac: float = 0.5, num_blocks: int = 4,
                 block_frac: float = 0.25, overlap: int = 0, overlap_weight: float = 10.0, decoder_min_width: int = 32,
                 **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        needs_feature_map(backbone, type(self).__name__)
        if mask not in MASKS:
            raise UserError(f"method.mask={mask!r}; allowed: {', '.join(MASKS)}")
        size, channels = views.groups[0]["size"], views.mean.numel()
        h = feature_map_size(backbone, channels, size)
        self.decoder = ImageDecoder(feature_channels(backbone), channels, h, size, decoder_min_width)

    def holes(self, x: torch.Tensor) -> torch.Tensor:
        """The target holes (B x 1 x S x S, True = missing) of a batch."""
        hp, (B, S) = self.hparams, (x.shape[0], x.shape[-1])
        if hp.mask == "center":
            return center_mask(S, hp.mask_frac).to(x.device).expand(B, 1, S, S)
        return random_block_masks(B, S, hp.num_blocks, hp.block_frac, x.device).unsqueeze(1)

    def reconstruct(self, x: torch.Tensor):
        """(encoder input, target hole, reconstruction) of normalised images ``x`` (B x C x S x S)."""
        hole = self.holes(x)  # B x 1 x S x S
        x_in = x.masked_fill(shrink(hole, self.hparams.overlap), 0.0)  # the encoder's hole: target minus overlap
        x_hat = self.decoder(self.backbone.feature_map(x_in), size=x.shape[-1])  # B x C x S x S
        return x_in, hole, x_hat

    def training_loss(self, views):
        x = self.images(views)  # B x C x S x S, normalised
        _, hole, x_hat = self.reconstruct(x)
        w = overlap_weights(hole, self.hparams.overlap, self.hparams.overlap_weight)  # B x 1 x S x S, 0 outside
        return (w * (x_hat.float() - x) ** 2).sum() / (w.sum() * x.shape[1])  # weighted mean over the hole

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.fixed_randomness(x):  # the same random holes at every epoch
            x_in, hole, x_hat = self.reconstruct(x)
        return {"input": self.rgb(x_in), "prediction": self.rgb(torch.where(hole, x_hat.float(), x)),
                "target": self.rgb(x)}

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        m, size = cfg.method, crop_size(cfg)
        mask, overlap = m.get("mask", "center"), m.get("overlap", 0)
        if mask not in MASKS:
            return problems + [f"method.mask={mask} is not allowed; use center or random"]
        key = "mask_frac" if mask == "center" else "block_frac"
        frac = m.get(key, 0.5 if mask == "center" else 0.25)
        if not 0 < frac < 1:
            problems.append(f"method.{key}={frac} must be in (0, 1)")
        elif size is not None and 2 * overlap >= round(size * frac):
            problems.append(f"method.overlap={overlap} px leaves no hole for the encoder in a {round(size * frac)} px "
                            f"hole of a {size} px crop; use method.overlap < {(round(size * frac) + 1) // 2}")
        return problems
