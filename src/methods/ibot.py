"""iBOT (Zhou et al. 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer"): DINO's self-distillation on the
CLS token plus masked image modelling against an online tokenizer, the EMA teacher itself (bytedance/ibot
``main_ibot.py``).

    masks  = blocks on a random half of the global crops, ratio ~ U(0.1, 0.5)       # loader.py ImageFolderMask
    t      = teacher(globals)                   -> CLS and every patch token, through the teacher's head
    s      = student(globals with masked patches -> mask token), student(locals) -> CLS (+ masked patches)
    L_cls  = DINO's cross-view loss on the CLS outputs (centre c, teacher tau warmed up 0.04 -> 0.07)
    L_mim  = sum_k -softmax((t_patch - c2) / tau2) log softmax(s_patch / 0.1) on the masked patches of each crop,
             per image / its masked count, mean over the crops                     # eq. 2
    loss   = L_cls + L_mim;  c, c2 <- EMA of the teacher's CLS / patch outputs over the global batch

The head is shared by the CLS and the patch tokens (the ViT-S recipe's ``--shared_head true``); ``shared_head:
false`` gives the patches their own weight-normalised last layer (iBOT's ``last_layer2``, the MLP stays shared).
The teacher is built without stochastic depth (``frozen_copy``), sees the unmasked global crops and follows the
student by EMA (momentum 0.996 -> 1). ``head_warmup_epochs``: the heads (and by EMA the teacher's heads) train
alone first, the backbone frozen, and the backbone's lr warm-up starts when it joins (continued pre-training
from weights whose heads were never published).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from src.backbones.vit import require_token_api
from src.methods.dino import DINO
from src.methods.pretext_base import token_backbone_problems
from src.nn.ema import frozen_copy
from src.nn.heads import NormalizedLinear
from src.nn.multicrop import num_global_views, size_runs
from src.nn.optim import decay_groups
from src.nn.schedules import warmup_cosine
from src.nn.self_distillation import (
    distillation_loss,
    ibot_masks,
    ibot_patch_loss,
    mask_ratio_range_problems,
    teacher_softmax,
    update_center_,
)


def _after_head_warmup(step: int, start: int, total: int, warmup: int, min_ratio: float) -> float:
    """The backbone's lr multiplier: 0 during the head warm-up, then the usual warm-up + cosine over the rest."""
    return 0.0 if step < start else warmup_cosine(step - start, total - start, warmup, min_ratio)


class IBOT(DINO):
    needs_tokens = True  # the student masks patch tokens: a ViT with the token API

    def __init__(self, backbone, views, optimizer, out_dim: int = 8192, patch_out_dim: int = 8192,
                 shared_head: bool = True, teacher_patch_temp: float = 0.07, warmup_teacher_patch_temp: float = 0.04,
                 mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 mask_min_aspect: float = 0.3, cls_weight: float = 1.0, patch_weight: float = 1.0,
                 head_warmup_epochs: float = 0, **kwargs):
        require_token_api(backbone, type(self).__name__)
        mask_ratio = tuple(float(r) for r in mask_ratio)  # plain values in the hyperparameters (a yaml list is not)
        for problem in mask_ratio_range_problems("method.mask_ratio", list(mask_ratio), mask_probability,
                                                 "method.mask_probability"):
            raise ValueError(problem)
        backbone.add_mask_token()  # before the teacher is copied: both hold it, as both of iBOT's ViTs do
        super().__init__(backbone, views, optimizer, out_dim=out_dim, **kwargs)
        self.hparams["mask_ratio"] = mask_ratio  # a subclass's **kwargs may have brought the yaml's ListConfig
        self.patch_head = None if shared_head else self.build_patch_head()
        self.patch_head_t = None if self.patch_head is None else frozen_copy(self.patch_head)
        k = out_dim if shared_head else patch_out_dim
        self.register_buffer("patch_center", torch.zeros(1, 1, k))  # iBOT's center2
        self._head_steps = 0  # optimizer steps of the head warm-up (set with the optimizer)

    # ---- construction --------------------------------------------------------------------------------
    def build_patch_head(self) -> nn.Module:
        """iBOT's ``last_layer2``: a weight-normalised layer of its own on the shared MLP's bottleneck."""
        h = self.hparams
        return NormalizedLinear(h.bottleneck_dim, h.patch_out_dim, learn_norm=not h.norm_last_layer)

    def momentum_pairs(self):
        pairs = super().momentum_pairs()
        return pairs + ([(self.patch_head, self.patch_head_t)] if self.patch_head is not None else [])

    def patch_last_layer(self) -> nn.Module | None:
        """The patch head's own last layer (frozen with the CLS head's in the first epoch), if it has one."""
        return self.patch_head

    def frozen_parameters(self):
        frozen = super().frozen_parameters()  # DINO: the last layer in the first epoch
        if frozen and self.patch_last_layer() is not None:
            frozen += list(self.patch_last_layer().parameters())  # every "last_layer" of the reference
        if self.global_step < self._head_steps:
            frozen += list(self.backbone.parameters())  # head warm-up
        return frozen

    # ---- heads ---------------------------------------------------------------------------------------
    def head_outputs(self, cls: torch.Tensor, patches: torch.Tensor, teacher: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS logits N x K, patch logits P x K') of CLS tokens (N x D) and patch tokens (P x D) through the
        student's or the teacher's head: one pass of the shared MLP over both."""
        head, last2 = (self.head_t, self.patch_head_t) if teacher else (self.head, self.patch_head)
        if last2 is None:
            out = head(torch.cat([cls, patches]))
            return out[: cls.shape[0]], out[cls.shape[0]:]
        z = F.normalize(head.mlp(torch.cat([cls, patches])), dim=1)
        return head.last_layer(z[: cls.shape[0]]), last2(z[cls.shape[0]:])

    # ---- masks and schedules -------------------------------------------------------------------------
    def draw_masks(self, n: int, grid: tuple[int, int], device) -> torch.Tensor:
        h = self.hparams
        return ibot_masks(n, grid, h.mask_probability, tuple(h.mask_ratio), h.mask_min_aspect, device)

    def patch_temperature(self) -> float:
        """The patch targets' teacher temperature, warmed up like the CLS one (DINO's :meth:`teacher_temperature`:
        iBOT's ``teacher_temp2_schedule``, np.linspace over the first ``warmup_teacher_temp_epochs`` epochs, capped
        at half the run) from ``warmup_teacher_patch_temp`` to ``teacher_patch_temp``."""
        h = self.hparams
        if self._trainer is None or h.warmup_teacher_temp_epochs <= 0:
            return h.teacher_patch_temp
        warmup = min(int(h.warmup_teacher_temp_epochs), max(self.trainer.max_epochs, 1) // 2)
        if self.current_epoch >= warmup:
            return h.teacher_patch_temp
        progress = self.current_epoch / max(warmup - 1, 1)
        return h.warmup_teacher_patch_temp + progress * (h.teacher_patch_temp - h.warmup_teacher_patch_temp)

    # ---- the step ------------------------------------------------------------------------------------
    def encode_cls(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The student's CLS tokens (V N x D) of unmasked views, one backbone pass per run of equal sizes."""
        b = self.backbone
        return torch.cat([b.encode(b.tokens(torch.cat(views[run])))[:, 0] for run in size_runs(views)])

    def training_loss(self, views):
        h = self.hparams
        n_global = num_global_views(views)
        g = torch.cat(views[:n_global])  # G N x C x H x W
        masks = self.draw_masks(g.shape[0], self.backbone.grid(g), g.device)  # G N x L
        with torch.no_grad():
            t = self.backbone_t.encode(self.backbone_t.tokens(g))  # G N x 1+L x D, unmasked crops
            t_cls, t_patch = self.head_outputs(t[:, 0], t[:, 1:].flatten(0, 1), teacher=True)  # G N x K, G N L x K'
        s = self.backbone.encode(self.backbone.tokens(g, masks))  # G N x 1+L x D
        cls = s[:, 0] if n_global == len(views) else torch.cat([s[:, 0], self.encode_cls(views[n_global:])])
        s_cls, s_patch = self.head_outputs(cls, s[:, 1:][masks], teacher=False)  # V N x K, M x K'

        temp, patch_temp = self.teacher_temperature(), self.patch_temperature()
        q_cls = teacher_softmax(t_cls, self.center, temp)
        q_patch = teacher_softmax(t_patch, self.patch_center, patch_temp).view(*masks.shape, -1)[masks]  # M x K'
        cls_loss = distillation_loss(list(s_cls.chunk(len(views))), list(q_cls.chunk(n_global)), h.student_temp)
        patch_loss = ibot_patch_loss(s_patch, q_patch, masks, h.student_temp)
        self.update_center(t_cls)
        update_center_(self.patch_center, t_patch, h.center_momentum)  # every teacher patch token, as iBOT
        loss = h.cls_weight * cls_loss + h.patch_weight * patch_loss
        return loss, {"cls_loss": cls_loss.detach(), "patch_loss": patch_loss.detach(),
                      "teacher_temp": torch.tensor(temp)}

    # ---- optimizer -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weight decay on weights only, the backbone's groups marked (its lr waits for the head warm-up)."""
        others = [p for name, p in self.named_parameters() if not name.startswith("backbone.")]
        return decay_groups(self.backbone.parameters(), backbone=True) + decay_groups(others)

    def configure_optimizers(self):
        out = super().configure_optimizers()
        epochs = self.hparams.head_warmup_epochs
        self._head_steps = self.warmup_steps(epochs, "head warm-up") if epochs > 0 else 0
        if self._head_steps:
            optimizer, schedule = out["optimizer"], out["lr_scheduler"]["scheduler"]
            total = int(self.trainer.estimated_stepping_batches)
            warmup = self.warmup_steps(self.hparams.warmup_epochs, "warm-up")
            for i, group in enumerate(optimizer.param_groups):
                if group.get("backbone") and not group.get("fixed_lr"):
                    schedule.lr_lambdas[i] = functools.partial(_after_head_warmup, start=self._head_steps, total=total,
                                                               warmup=warmup, min_ratio=self.hparams.min_lr_ratio)
                    group["lr"] = group["initial_lr"] * schedule.lr_lambdas[i](schedule.last_epoch)
        return out

    # ---- pre-flight ----------------------------------------------------------------------------------
    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views) + token_backbone_problems(cls, cfg)
        m = cfg.method
        problems += mask_ratio_range_problems("method.mask_ratio", m.get("mask_ratio"), m.get("mask_probability"),
                                              "method.mask_probability")
        warm = m.get("head_warmup_epochs", 0)
        if isinstance(warm, int | float) and warm < 0:
            problems.append(f"method.head_warmup_epochs={warm} must be >= 0 (epochs with the backbone frozen)")
        return problems
