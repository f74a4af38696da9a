"""Split-Brain Autoencoders (Zhang et al. 2017): two disjoint networks predict each half of Lab from the other.

F1 (the injected backbone, one input channel) colours L -> ab exactly as Colorization does (classification
over the in-gamut ab bins); F2 (a deep copy of it with two input channels and freshly reset parameters)
predicts L from ab / 110 as classification over ``num_l_bins`` lightness bins (the nearest bin is the target).
The loss is the sum of both; the representation is the concatenation of both halves' pooled features.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from src.backbones.channels import with_in_channels
from src.methods.colorization import LOSSES, Colorization
from src.nn.color import annealed_mean, area_resize, l_bins, l_encode, lab_to_rgb
from src.nn.decoders import DenseClassifier, feature_channels


class SplitBrain(Colorization):
    def __init__(self, backbone, views, optimizer, num_l_bins: int = 100, rebalance: bool = False, **kwargs):
        super().__init__(backbone, views, optimizer, rebalance=rebalance, **kwargs)  # self.backbone: L -> ab
        self.ab_backbone = with_in_channels(copy.deepcopy(self.backbone), 2)  # ab -> L
        for m in self.ab_backbone.modules():  # the halves start independent
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.register_buffer("l_centres", l_bins(num_l_bins), persistent=False)  # num_l_bins x 1
        self.l_head = DenseClassifier(feature_channels(backbone), self.hparams.hidden_dim,
                                      num_l_bins if self.hparams.loss == LOSSES[0] else 1)

    @property
    def feature_dim(self) -> int:
        return 2 * self.backbone.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lab = self.lab(x)  # B x 3 x S x S
        f1 = self.backbone(self.memory(lab[:, :1] / 50 - 1))  # B x D
        f2 = self.ab_backbone(self.memory(lab[:, 1:] / 110))  # B x D
        return torch.cat([f1, f2], dim=1)  # B x 2D

    # ---- ab -> L -------------------------------------------------------------------------------------
    def predict_l(self, ab: torch.Tensor) -> torch.Tensor:
        f = self.ab_backbone.feature_map(self.memory(ab / 110))  # B x D x h x w
        return self.l_head(f, self.out_size(f, ab))  # B x num_l_bins x s x s (regression: B x 1 x s x s)

    def l_loss(self, out: torch.Tensor, L: torch.Tensor):
        L = area_resize(L, out.shape[-1])  # B x 1 x s x s
        if self.hparams.loss == "regression":
            return F.mse_loss(out.float(), L / 50 - 1), {}
        target = l_encode(L[:, 0], len(self.l_centres))  # B x s x s
        return F.cross_entropy(out.float(), target), {"l_bin_acc": (out.argmax(dim=1) == target).float().mean()}

    def decode_l(self, out: torch.Tensor) -> torch.Tensor:
        return annealed_mean(out, self.l_centres, 1.0) if self.hparams.loss == LOSSES[0] else (out.float() + 1) * 50

    def training_loss(self, views):
        lab = self.lab(self.images(views))  # B x 3 x S x S
        L, ab = lab[:, :1], lab[:, 1:]
        loss_ab, logs_ab = self.ab_loss(self.predict_ab(L), ab)  # F1: L -> ab
        loss_l, logs_l = self.l_loss(self.predict_l(ab), L)  # F2: ab -> L
        logs = {"loss_ab": loss_ab.detach(), "loss_l": loss_l.detach(), **logs_l}
        if "bin_acc" in logs_ab:
            logs["ab_bin_acc"] = logs_ab["bin_acc"]
        return loss_ab + loss_l, logs

    @torch.no_grad()
    def pictures(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lab = self.lab(x)
        L, ab = lab[:, :1], lab[:, 1:]
        L_hat = F.interpolate(self.decode_l(self.predict_l(ab)), size=L.shape[-2:], mode="bilinear",
                              align_corners=False)
        return {"input (L)": self.to_rgb(L, torch.zeros_like(ab)),
                "ab from L": self.to_rgb(L, self.decode_ab(self.predict_ab(L))),
                "L from ab": lab_to_rgb(torch.cat([L_hat, ab], dim=1)), "target": self.rgb(x)}
