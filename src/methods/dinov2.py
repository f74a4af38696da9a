"""DINOv2 (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"): DINO's CLS loss, iBOT's
masked-patch loss and the KoLeo regulariser, as facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py`` trains
them with ``dinov2/configs/ssl_default_config.yaml``.

    masks  = half the global crops (exactly), ratios stratified over [0.1, 0.5], blocks >= 4 patches   # collate.py
    t      = teacher(globals) -> CLS and the masked patches, through the teacher's head(s)
    q      = softmax((t - c) / tau_t) with EMA centres (centering: centering), or 3 Sinkhorn-Knopp
             iterations over every process's rows (centering: sinkhorn_knopp)
    s      = student(globals with masked patches -> mask token), student(locals) -> CLS (+ masked patches)
    loss   = DINO(s_cls, q_cls) over every (teacher global, other student view) pair
           + 0.1 x sum over the global crops of KoLeo(L2-normalised backbone CLS of the student)
           + iBOT(s_patch, q_patch), each crop normalised by its masked count

The head is shared by the CLS and the patch tokens unless ``shared_head: false`` (then the patches get a whole
DINO head of their own, DINOv2's ``ibot_head``, as its ViT-L/g configs use). Teacher without stochastic depth,
momentum 0.992 -> 1; gradients clipped to norm 3 per module (backbone, head, patch head); layer-wise lr decay 0.9
and 0.2 x lr for the patch embedding; the last layers frozen in the first epoch.
"""

from __future__ import annotations

import torch

from src.methods.base import SSLMethod
from src.methods.ibot import IBOT
from src.nn.heads import DINOHead
from src.nn.multicrop import num_global_views
from src.nn.self_distillation import (
    dinov2_masks,
    distillation_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    update_center_,
)
from src.utils.errors import UserError

CENTERINGS = ("centering", "sinkhorn_knopp")
EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def vit_layer(name: str, depth: int) -> int:
    """DINOv2's ``get_vit_lr_decay_rate`` layer of a backbone parameter (names under the timm network): 0 for the
    embeddings and tokens, i + 1 for block i, depth + 1 for the rest (the final norm)."""
    if name.split(".")[0] in EMBEDDINGS:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class DINOv2(IBOT):
    def __init__(self, backbone, views, optimizer, out_dim: int = 65536, patch_out_dim: int = 65536,
                 shared_head: bool = True, patch_hidden_dim: int = 2048, patch_bottleneck_dim: int = 256,
                 patch_head_layers: int = 3, teacher_temp: float = 0.07, warmup_teacher_temp: float = 0.04,
                 centering: str = "centering", sinkhorn_iterations: int = 3, koleo_weight: float = 0.1,
                 mask_min_block: int = 4, layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2,
                 momentum: float = 0.992, **kwargs):
        if centering not in CENTERINGS:
            raise UserError(f"method.centering={centering!r}; allowed: {', '.join(CENTERINGS)}")
        super().__init__(backbone, views, optimizer, out_dim=out_dim, patch_out_dim=patch_out_dim,
                         shared_head=shared_head, teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
                         teacher_patch_temp=teacher_temp, warmup_teacher_patch_temp=warmup_teacher_temp,
                         momentum=momentum, **kwargs)

    def teacher_temperature(self) -> float:
        """Per iteration, as DINOv2's ``teacher_temp_schedule`` (``CosineScheduler`` with warm-up only):
        np.linspace(warmup_teacher_temp, teacher_temp) over the first ``warmup_teacher_temp_epochs`` epochs of steps
        (capped at half the run), then constant; the patch targets use the same temperature."""
        h = self.hparams
        if self._trainer is None or h.warmup_teacher_temp_epochs <= 0:
            return h.teacher_temp
        if not hasattr(self, "_temp_warmup_steps"):
            self._temp_warmup_steps = self.warmup_steps(h.warmup_teacher_temp_epochs, "teacher temperature warm-up")
        step, warmup = self.trainer.global_step, self._temp_warmup_steps
        if step >= warmup:
            return h.teacher_temp
        return h.warmup_teacher_temp + step / max(warmup - 1, 1) * (h.teacher_temp - h.warmup_teacher_temp)

    def patch_temperature(self) -> float:
        return self.teacher_temperature()

    def build_patch_head(self):
        """DINOv2's ``ibot_head``: a whole DINO head of its own for the patch tokens."""
        h = self.hparams
        return DINOHead(self.backbone.out_dim, h.patch_out_dim, h.patch_hidden_dim, h.patch_bottleneck_dim,
                        h.patch_head_layers, h.head_batch_norm, h.norm_last_layer)

    def patch_last_layer(self):
        return None if self.patch_head is None else self.patch_head.last_layer

    def head_outputs(self, cls, patches, teacher):
        if self.patch_head is None:
            return super().head_outputs(cls, patches, teacher)
        head, patch_head = (self.head_t, self.patch_head_t) if teacher else (self.head, self.patch_head)
        return head(cls), patch_head(patches)

    def draw_masks(self, n, grid, device):
        h = self.hparams
        return dinov2_masks(n, grid, h.mask_probability, tuple(h.mask_ratio), h.mask_min_block, h.mask_min_aspect,
                            device)

    @torch.no_grad()
    def teacher_targets(self, t_cls: torch.Tensor, t_patch: torch.Tensor, temp: float):
        """(CLS targets, masked-patch targets): centring with EMA centres (updated after use), or Sinkhorn-Knopp."""
        h = self.hparams
        if h.centering == "sinkhorn_knopp":
            return (sinkhorn_knopp(t_cls, temp, h.sinkhorn_iterations),
                    sinkhorn_knopp(t_patch, temp, h.sinkhorn_iterations))
        q_cls, q_patch = teacher_softmax(t_cls, self.center, temp), teacher_softmax(t_patch, self.patch_center, temp)
        self.update_center(t_cls)
        update_center_(self.patch_center, t_patch, h.center_momentum)  # the masked patches of every process
        return q_cls, q_patch

    def training_loss(self, views):
        h = self.hparams
        n_global = num_global_views(views)
        g = torch.cat(views[:n_global])  # G N x C x H x W
        masks = self.draw_masks(g.shape[0], self.backbone.grid(g), g.device)  # G N x L
        temp = self.teacher_temperature()
        with torch.no_grad():
            t = self.backbone_t.encode(self.backbone_t.tokens(g))  # G N x 1+L x D, unmasked crops
            t_cls, t_patch = self.head_outputs(t[:, 0], t[:, 1:][masks], teacher=True)  # G N x K, M x K'
            q_cls, q_patch = self.teacher_targets(t_cls, t_patch, temp)
        s = self.backbone.encode(self.backbone.tokens(g, masks))  # G N x 1+L x D
        cls = s[:, 0] if n_global == len(views) else torch.cat([s[:, 0], self.encode_cls(views[n_global:])])
        s_cls, s_patch = self.head_outputs(cls, s[:, 1:][masks], teacher=False)  # V N x K, M x K'

        dino = distillation_loss(list(s_cls.chunk(len(views))), list(q_cls.chunk(n_global)), h.student_temp)
        patch = ibot_patch_loss(s_patch, q_patch, masks, h.student_temp)
        loss = h.cls_weight * dino + h.patch_weight * patch
        logs = {"dino_loss": dino.detach(), "ibot_loss": patch.detach(), "teacher_temp": torch.tensor(temp)}
        if h.koleo_weight > 0:  # each global crop on its own (never two crops of one image), over every process
            koleo = sum(koleo_loss(c, gather=True) for c in s[:, 0].chunk(n_global))
            loss = loss + h.koleo_weight * koleo
            logs["koleo_loss"] = koleo.detach()
        return loss, logs

    def on_before_optimizer_step(self, optimizer) -> None:
        """DINOv2 clips each student module's gradient norm (backbone, head, patch head) to ``clip_grad``, then the
        frozen parameters' gradients are dropped (its last layers' lr is 0 in the first epoch)."""
        if self.hparams.clip_grad:
            for module in (self.backbone, self.head, self.patch_head):
                if module is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None],
                                                   self.hparams.clip_grad)
        SSLMethod.on_before_optimizer_step(self, optimizer)

    def param_groups(self) -> list[dict]:
        """DINOv2's ``get_params_groups_with_decay``: backbone lr x layer_decay^(depth + 1 - layer), x
        patch_embed_lr_mult for the patch embedding; heads at the full lr; no weight decay on biases, norms and
        LayerScale (ndim <= 1)."""
        h = self.hparams
        depth = len(self.backbone.net.blocks)
        groups: dict[tuple, list] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            inner = name.removeprefix("backbone.net.")
            backbone = name.startswith("backbone.")
            ratio = h.layer_decay ** (depth + 1 - vit_layer(inner, depth)) if backbone else 1.0
            ratio *= h.patch_embed_lr_mult if backbone and inner.startswith("patch_embed.") else 1.0
            groups.setdefault((ratio, p.ndim > 1, backbone), []).append(p)
        return [{"params": params, "lr_ratio": ratio, "backbone": backbone,
                 **({} if decay else {"weight_decay": 0.0, "lars_exclude": True})}
                for (ratio, decay, backbone), params in groups.items()]

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        centering = cfg.method.get("centering", "centering")
        if centering not in CENTERINGS:
            problems.append(f"method.centering={centering!r}; allowed: {', '.join(CENTERINGS)}")
        return problems
