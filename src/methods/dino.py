"""DINO (Caron et al. 2021): self-distillation with no labels. A student matches the sharpened, centred
output distribution of an EMA teacher across views (Algorithm 1).

The student sees every view of the multi-crop recipe, the teacher only the global ones; a teacher view
is never compared with the same student view. The center is a buffer updated with the teacher outputs of
all processes; the teacher temperature warms up linearly; the teacher momentum rises by cosine to 1; the
weight-normalised last layer of the head gets no gradient during the first ``freeze_last_layer_epochs``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from src.methods.base import SSLMethod
from src.nn.ema import frozen_copy
from src.nn.heads import DINOHead
from src.nn.losses import dino_loss
from src.nn.multicrop import num_global_views
from src.utils import distributed as du
from src.utils.errors import UserError

EVALUATED = ("teacher", "student")


def evaluate_problem(value) -> str:
    return f"method.evaluate={value!r}; allowed: {', '.join(EVALUATED)} (the backbone evaluation and export read)"


class DINO(SSLMethod):
    def __init__(self, backbone, views, optimizer, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, head_layers: int = 3, head_batch_norm: bool = False,
                 norm_last_layer: bool = True, freeze_last_layer_epochs: float = 1, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: float = 0, center_momentum: float = 0.9, clip_grad: float | None = 3.0,
                 momentum: float = 0.996, momentum_end: float = 1.0, evaluate: str = "teacher", **kwargs):
        if evaluate not in EVALUATED:
            raise UserError(evaluate_problem(evaluate))
        super().__init__(backbone, views, optimizer, momentum=momentum, momentum_end=momentum_end, **kwargs)
        self.head = DINOHead(backbone.out_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, head_batch_norm,
                             norm_last_layer)
        self.backbone_t, self.head_t = frozen_copy(self.backbone), frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))  # 1 x K

    def momentum_pairs(self):
        return [(self.backbone, self.backbone_t), (self.head, self.head_t)]

    @property
    def evaluated_backbone(self):
        """``evaluate: teacher`` (default): DINO's (and iBOT's, DINOv2's) evaluation, attention maps and released
        weights are the teacher's (``eval_knn.py``/``eval_linear.py``/``visualize_attention.py --checkpoint_key
        teacher``); ``student``: the online backbone (the teacher lags it in runs of a few hundred steps)."""
        return self.backbone_t if self.hparams.evaluate == "teacher" else self.backbone

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        if (evaluate := cfg.method.get("evaluate", "teacher")) not in EVALUATED:
            problems.append(evaluate_problem(evaluate))
        return problems

    def frozen_parameters(self):
        return list(self.head.last_layer.parameters()) if self.current_epoch < self.hparams.freeze_last_layer_epochs else []

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.hparams.clip_grad:  # per-tensor norm clipping, as in the paper's code
            for p in self.parameters():
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.hparams.clip_grad)

    def teacher_temperature(self) -> float:
        """Per epoch, as main_dino.py's ``teacher_temp_schedule``: ``np.linspace(warmup_teacher_temp, teacher_temp,
        W)`` over the first W = ``warmup_teacher_temp_epochs`` epochs (so epoch W - 1 already has ``teacher_temp``),
        then constant. W is capped at half the run, as every warm-up here (a logged line)."""
        h = self.hparams
        if self._trainer is None or h.warmup_teacher_temp_epochs <= 0:
            return h.teacher_temp
        if not hasattr(self, "_teacher_warmup"):
            epochs = max(self.trainer.max_epochs, 1)
            self._teacher_warmup = int(h.warmup_teacher_temp_epochs)
            if self._teacher_warmup > epochs // 2:
                rank_zero_info(f"teacher temperature warm-up of {h.warmup_teacher_temp_epochs} epochs is more than "
                               f"half of this {epochs}-epoch run; using {epochs // 2} epochs instead")
                self._teacher_warmup = epochs // 2
        if self.current_epoch >= self._teacher_warmup:
            return h.teacher_temp
        progress = self.current_epoch / max(self._teacher_warmup - 1, 1)
        return h.warmup_teacher_temp + progress * (h.teacher_temp - h.warmup_teacher_temp)

    def training_loss(self, views):
        n_global = num_global_views(views)
        student = self.embed(views, head=self.head)  # V x (N x K)
        with torch.no_grad():
            teacher = self.embed(views[:n_global], head=self.head_t, backbone=self.backbone_t)  # G x (N x K)
        temp = self.teacher_temperature()
        loss = dino_loss(student, teacher, self.center, self.hparams.student_temp, temp)
        self.update_center(torch.cat(teacher))
        return loss, {"teacher_temp": torch.tensor(temp)}

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher outputs over the global batch."""
        count = teacher.shape[0] * du.world_size()
        batch_center = du.all_reduce_sum(teacher.float().sum(dim=0, keepdim=True)) / count  # 1 x K
        self.center.mul_(self.hparams.center_momentum).add_(batch_center, alpha=1 - self.hparams.center_momentum)
