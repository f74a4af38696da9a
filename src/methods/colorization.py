"""Colorful Image Colorization (Zhang et al. 2016): predict the ab colours of an image from its lightness L.

The view is converted to CIE Lab on the device; the backbone, adapted to one input channel, reads
L / 50 - 1; a dense head on its feature map, resized bilinearly to ``target_size``, classifies every pixel
into the Q in-gamut ab bins. Targets are soft-encoded (5 nearest bins, Gaussian sigma 5) from the ab of the
view area-downsampled to that size; the cross-entropy is class-rebalanced (Eq. 2-4) with weights from an
empirical prior kept as bin counts in a buffer (accumulated over the training batches of every process).
``loss="regression"`` is the L2 baseline on ab / 110. Evaluation reads pooled features of the L channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.backbones.channels import with_in_channels
from src.methods.pretext_base import PretextTask
from src.nn.color import (
    ab_gamut_bins,
    annealed_mean,
    area_resize,
    lab_to_rgb,
    rebalance_weights,
    rgb_to_lab,
    soft_encode,
)
from src.nn.decoders import DenseClassifier, feature_channels, needs_feature_map
from src.utils import distributed as du
from src.utils.errors import UserError

LOSSES = ("classification", "regression")


class Colorization(PretextTask):
    needs_colour = True  # RGB data only: PretextTask.config_problems says so before training

    def __init__(self, backbone, views, optimizer, loss: str = "classification", hidden_dim: int = 256,
                 target_size: int | None = None, k: int = 5, sigma: float = 5.0, rebalance: bool = True,
                 lam: float = 0.5, T: float = 0.38, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        needs_feature_map(backbone, type(self).__name__)
        if loss not in LOSSES:
            raise UserError(f"method.loss={loss!r}; allowed: {', '.join(LOSSES)}")
        with_in_channels(self.backbone, 1)  # reads L
        self.register_buffer("centres", ab_gamut_bins(), persistent=False)  # Q x 2
        self.register_buffer("counts", torch.zeros(len(self.centres), dtype=torch.long))  # empirical prior
        self.head = DenseClassifier(feature_channels(backbone), hidden_dim, len(self.centres) if loss == LOSSES[0] else 2)

    # ---- Lab ---------------------------------------------------------------------------------------
    def lab(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised RGB views (B x 3 x S x S) -> Lab (B x 3 x S x S, float32, autocast off)."""
        return rgb_to_lab(self.rgb(x))

    def memory(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of the lightness of normalised RGB views (the colour is never seen)."""
        return self.backbone(self.memory(self.lab(x)[:, :1] / 50 - 1))  # B x D

    # ---- L -> ab -------------------------------------------------------------------------------------
    def out_size(self, f: torch.Tensor, x: torch.Tensor) -> int:
        """Side of the predictions: ``target_size``, else max(h, S // 4) (Zhang predicts at 1/4 resolution)."""
        return self.hparams.target_size or max(f.shape[-1], x.shape[-1] // 4)

    def predict_ab(self, L: torch.Tensor) -> torch.Tensor:
        f = self.backbone.feature_map(self.memory(L / 50 - 1))  # B x D x h x w
        return self.head(f, self.out_size(f, L))  # B x Q x s x s (regression: B x 2 x s x s)

    def ab_loss(self, out: torch.Tensor, ab: torch.Tensor):
        """Eq. 2: -sum_q v(Z) Z_q log Z^_q averaged over pixels, Z soft-encoded, v the rebalancing weight of
        the nearest bin (or L2 on ab / 110)."""
        hp = self.hparams
        ab = area_resize(ab, out.shape[-1])  # B x 2 x s x s
        if hp.loss == "regression":
            return F.mse_loss(out.float(), ab / 110), {}
        with torch.no_grad():
            z = soft_encode(ab, self.centres, hp.k, hp.sigma)  # B x Q x s x s
            nearest = z.argmax(dim=1)  # B x s x s
            self.counts += du.all_reduce_sum(torch.bincount(nearest.flatten(), minlength=len(self.centres)))
            w = rebalance_weights(self.counts, self.centres, hp.lam, hp.sigma)[nearest] if hp.rebalance else 1.0
        ce = -(z * F.log_softmax(out.float(), dim=1)).sum(dim=1)  # B x s x s
        return (w * ce).mean(), {"bin_acc": (out.argmax(dim=1) == nearest).float().mean()}

    def decode_ab(self, out: torch.Tensor) -> torch.Tensor:
        """Predicted ab (B x 2 x s x s): annealed mean of the bin distribution (Eq. 5), or the regression."""
        return annealed_mean(out, self.centres, self.hparams.T) if self.hparams.loss == LOSSES[0] else out.float() * 110

    def training_loss(self, views):
        lab = self.lab(self.images(views))  # B x 3 x S x S
        return self.ab_loss(self.predict_ab(lab[:, :1]), lab[:, 1:])

    # ---- pictures ------------------------------------------------------------------------------------
    @staticmethod
    def to_rgb(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] of L (B x 1 x S x S) with ab (B x 2 x s x s) resized bilinearly to S."""
        ab = F.interpolate(ab.float(), size=L.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([L, ab], dim=1))

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        L = self.lab(x)[:, :1]
        return {"input (L)": self.to_rgb(L, torch.zeros_like(L).expand(-1, 2, -1, -1)),
                "prediction": self.to_rgb(L, self.decode_ab(self.predict_ab(L))), "target": self.rgb(x)}

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)  # with the colour check (needs_colour)
        loss = cfg.method.get("loss", LOSSES[0])
        if loss not in LOSSES:
            problems.append(f"method.loss={loss} is not allowed; use classification or regression")
        return problems
