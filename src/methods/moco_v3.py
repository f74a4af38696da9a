"""MoCo v3 (Chen, Xie & He 2021): symmetric contrastive loss between the two views' queries and the
momentum encoder's keys, negatives from the batch of every process (no queue).

    loss = ctr(q1, k2) + ctr(q2, k1),   ctr(q, k) = 2 tau * CE(q k_all^T / tau, labels + N * rank)   (Algorithm 1)

The query encoder is backbone + projector + predictor; the key encoder is a momentum copy of backbone +
projector, its momentum rising by cosine from ``momentum`` to 1; each view goes through both encoders alone
(``builder.py``: q1, q2, k1, k2 from four calls). Works with any backbone (ResNet, ViT). As the
reference (facebookresearch/moco-v3, ``moco/builder.py``): no linear of the MLPs has a bias; the projector has 3
layers on a ViT (``MoCo_ViT``) and 2 otherwise (``MoCo_ResNet``), and ends in an affine-free BatchNorm; so does
the predictor on a ViT only. On a ViT (``vits.py``) the linears start Xavier-uniform (q, k and v each as its own
matrix), the patch projection uniform in +-sqrt(6 / (C p^2 + D)), biases at zero and the CLS token N(0, 1e-6).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from src.backbones.resnet import zero_init_residual as init_residual_to_zero
from src.backbones.vit import has_token_api
from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import MLP
from src.nn.losses import info_nce
from src.nn.optim import LARS, decay_groups


@torch.no_grad()
def moco_v3_vit_init(vit: nn.Module) -> None:
    """The reference's ViT initialisation (``VisionTransformerMoCo.__init__``) on our ViT (its timm net)."""
    net = vit.net
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:  # q, k and v: three D x D matrices, each Xavier-uniform
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(net.cls_token, std=1e-6)
    proj = net.patch_embed.proj  # D x C x p x p: Xavier with fan-in C p^2 and fan-out D (not D p^2)
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


class MoCoV3(SSLMethod):
    def __init__(self, backbone, views, optimizer, temperature: float = 1.0, proj_hidden_dim: int = 4096,
                 proj_dim: int = 256, proj_layers: int | None = None, pred_hidden_dim: int = 4096,
                 pred_last_bn: bool | None = None, vit_init: bool = True, zero_init_residual: bool = True,
                 momentum: float = 0.99, momentum_end: float = 1.0, **kwargs):
        super().__init__(backbone, views, optimizer, momentum=momentum, momentum_end=momentum_end, **kwargs)
        self.temperature = temperature
        if zero_init_residual:  # main_moco.py: torchvision's ResNet with zero_init_residual=True
            init_residual_to_zero(backbone)
        vit = has_token_api(backbone)
        if vit and vit_init and not getattr(backbone, "pretrained", None):  # never over a weights file
            moco_v3_vit_init(backbone)
        proj_layers = proj_layers or (3 if vit else 2)
        pred_last_bn = vit if pred_last_bn is None else pred_last_bn
        self.projector = MLP(backbone.out_dim, proj_hidden_dim, proj_dim, num_layers=proj_layers, last_bn=True)
        self.predictor = MLP(proj_dim, pred_hidden_dim, proj_dim, num_layers=2, last_bn=pred_last_bn, last_bias=False)
        self.backbone_k, self.projector_k = frozen_copy(self.backbone), frozen_copy(self.projector)

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_k), (self.projector, self.projector_k)]

    def param_groups(self):
        """LARS (the ResNet recipe) leaves biases and norms without weight decay or adaptation; the reference's AdamW
        (the ViT recipe) is given every parameter with the same weight decay (``main_moco.py``)."""
        if getattr(self.optimizer_factory, "func", None) is LARS:
            return decay_groups(self.parameters())
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def contrastive(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return 2 * self.temperature * info_nce(q, k, temperature=self.temperature, gather=True)

    def training_loss(self, views):
        q1, q2 = self.embed(views[:2], head=lambda f: self.predictor(self.projector(f)), per_view=True)  # N x C each
        with torch.no_grad():
            k1, k2 = self.embed(views[:2], head=self.projector_k, backbone=self.backbone_k, per_view=True)
        return self.contrastive(q1, k2) + self.contrastive(q2, k1)
