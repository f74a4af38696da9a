"""SSLMethod: the plumbing every method shares, so a method file only says what its paper says.

A subclass writes ``training_loss(views) -> loss`` or ``(loss, {name: value})`` and, if it has a teacher,
``momentum_pairs() -> [(online, target), ...]``. The base makes views on the device, logs, builds the optimizer
(:mod:`src.nn.optim`), updates EMA targets once per optimizer step and stops or skips on a non-finite loss
(:mod:`src.nn.nonfinite`). Callbacks only read: ``first_view_features`` (online probe), ``batch_arrived`` (throughput),
``scaled_lr``, ``skipped_steps``, ``run_config``, ``evaluated_backbone``, ``feature_dim``, ``feature_network``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed import ReduceOp

from src.data.sampler import batch_seed
from src.nn import optim, schedules
from src.nn.ema import update_momentum
from src.nn.multicrop import embed_views
from src.nn.nonfinite import NonFiniteLossError, NonFiniteWatch, describe, restore_buffers, snapshot_buffers
from src.utils.errors import UserError


class SSLMethod(L.LightningModule):
    def __init__(self, backbone: nn.Module, views: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_epochs: float = 10, min_lr_ratio: float = 0.0, lr_scaling: str = "linear",
                 reference_batch_size: int = 256, momentum: float = 0.996, momentum_end: float | None = None,
                 weight_decay_end: float | None = None, channels_last: bool = False, nonfinite_loss: str = "stop",
                 compile: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "views", "optimizer"])
        self.backbone, self.views, self.optimizer_factory = backbone, views, optimizer
        self.skipped_steps, self._skipping = 0, False  # steps dropped for a non-finite loss (skip); checkpointed
        self.run_config: dict | None = None  # the run's resolved backbone/views/method/data config (src/train.py)
        self.batch_arrived: float | None = None  # host clock when the last training batch reached the device
        self._nonfinite = NonFiniteWatch()  # nonfinite_loss=stop: bad losses noted on the device

    # ---- what a method writes -------------------------------------------------------------------
    def training_loss(self, views: list[torch.Tensor]):
        raise NotImplementedError

    def batch_loss(self, batch: dict):
        """The loss of a training batch (``views``, ``image``, ``label`` and, with captions, ``text``); a method
        that needs more than the views (CLIP's captions) overrides this instead of :meth:`training_loss`."""
        return self.training_loss(batch["views"])

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient is dropped at this step (DINO's last layer in epoch 0, SwAV's prototypes)."""
        return []

    # ---- features (what evaluation reads) ---------------------------------------------------------
    @property
    def evaluated_backbone(self) -> nn.Module:
        """The backbone evaluation measures, export writes and fine-tuning starts from: the online one, unless the
        reference evaluates a momentum teacher (DINO, iBOT, DINOv2: their ``--checkpoint_key teacher``)."""
        return self.backbone

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`forward`'s features, the representation evaluation measures."""
        return self.evaluated_backbone.out_dim

    @property
    def feature_network(self) -> nn.Module:
        """What fine-tuning trains: the evaluated backbone, unless :meth:`forward` adds a step (colorization's L)."""
        return self.evaluated_backbone if type(self).forward is SSLMethod.forward else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features evaluation measures (:attr:`evaluated_backbone`); a training step uses :meth:`online`."""
        return self.evaluated_backbone(self._laid_out(x))

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """The online backbone's features (what a training step backpropagates through)."""
        return self.backbone(self._laid_out(x))

    def _laid_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else x

    # The online probe's cheap input (eval.online_probe.features=train_view): the detached backbone features of the
    # first view of this training batch (N x D), set by embed's online pass; None where the step made none.
    first_view_features: torch.Tensor | None = None

    def embed(self, views: list[torch.Tensor], head: nn.Module | None = None,
              backbone: nn.Module | None = None, per_view: bool = False) -> list[torch.Tensor]:
        """Per-view outputs of ``head(backbone(view))`` (:func:`src.nn.multicrop.embed_views`: one backbone pass per
        size, or per view with ``per_view``); the online backbone's (``backbone=None``) features of the first view are
        kept, detached, in :attr:`first_view_features`."""
        out, first = embed_views(views, self.online if backbone is None else backbone, head, per_view)
        if backbone is None:
            self.first_view_features = first.detach()
        return out

    def configure_model(self) -> None:
        """``compile=True``: the online backbone is compiled in place (inductor; parameters and keys unchanged)."""
        if self.hparams.compile and not getattr(self.backbone, "_compiled_call_impl", None):
            if why := optim.compile_unavailable(self.trainer.strategy.root_device):
                raise UserError(f"method.compile=true: {why}; set method.compile=false")
            self.backbone.compile()

    # ---- views on the device --------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is None or not self.trainer.training:
            return batch
        self.batch_arrived = time.perf_counter()  # the step starts here: making views is training (throughput.py)
        self.first_view_features = None  # only this batch's step may set them
        t, index = self.trainer, self.trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches before it
        torch.manual_seed(batch_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), t.global_rank, t.current_epoch, index))
        images, labels = batch[0], batch[1]
        out = {"views": self.make_views(images), "image": images, "label": labels}
        if len(batch) > 2:  # image–text data: the captions' tokens (B, L)
            out["text"] = batch[2]
        return out

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The training views of a uint8 batch on the device, laid out as the backbone wants them."""
        return [self._laid_out(v) for v in self.views(images)]

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """The batch's loss. ``nonfinite_loss=stop``: a bad loss is noted on the device, read at :meth:`check_nonfinite`
        (no sync per step); ``skip`` must decide before the optimizer step: one sync (and reduce) per step."""
        skip = self.hparams.nonfinite_loss == "skip"  # then a skipped step must leave no trace in the buffers
        saved = snapshot_buffers(self) if skip else []
        out = self.batch_loss(batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        bs = batch["image"].shape[0]
        if skip:  # every rank takes the same decision (a rank that skipped its backward alone would hang DDP)
            self._skipping = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        else:
            self._nonfinite.note(loss, logs, self.global_step)
        if self._skipping:
            restore_buffers(self, saved)
            self.skipped_steps += 1
            rank_zero_warn(f"{describe(loss, logs, self.global_step)}: step skipped ({self.skipped_steps} so far)")
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=bs)
            return None  # Lightning runs no backward; the optimizer finds no gradients and changes nothing

        # a progress-bar value is read back (.item()) after every batch: only on the CPU, where that costs nothing
        self.log("train/loss", loss, prog_bar=self.device.type == "cpu", batch_size=bs)
        for k, v in logs.items():  # a pretext task's accuracy is also averaged over each epoch (for results)
            self.log(f"train/{k}", v, batch_size=bs, on_epoch=k == "pretext_acc", sync_dist=k == "pretext_acc")
        if self._log_step():  # a Python number is copied to the device: only when the loggers write it
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def _log_step(self) -> bool:
        """Whether the loggers write this batch's step metrics (Lightning's rule: every ``log_every_n_steps``)."""
        return self.trainer._logger_connector.should_update_logs

    def check_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` for the first non-finite loss on any rank (one reduce, one sync): at logging
        steps, each epoch's last batch and before any checkpoint write, so the last good ``last.ckpt`` stays."""
        if self.hparams.nonfinite_loss != "stop" or self._trainer is None:
            return
        reduce_min = lambda t: self.trainer.strategy.reduce(t, reduce_op=ReduceOp.MIN)  # noqa: E731
        if found := self._nonfinite.first_bad(reduce_min if self.trainer.world_size > 1 else lambda t: t):
            raise NonFiniteLossError(f"{found}; lower method.optimizer.lr or check the data (or set "
                                     "nonfinite_loss=skip); the last good checkpoint is kept")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._log_step() or batch_idx + 1 >= self.trainer.num_training_batches:
            self.check_nonfinite()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if (end := self.hparams.weight_decay_end) is not None:  # DINO: weight_decay -> weight_decay_end by cosine
            t = self.trainer
            optim.step_weight_decay(t.optimizers[0], t.global_step, t.estimated_stepping_batches, end)

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self.frozen_parameters():
            p.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        """EMA right after each optimizer step (only called at accumulation boundaries), so that it is part of
        the step: a checkpoint written at the end of the batch holds the updated targets."""
        step = self.trainer.global_step  # optimizer steps before this one
        super().optimizer_step(*args, **kwargs)  # runs training_step (the closure)
        pairs = self.momentum_pairs()
        if not pairs or self._skipping:
            return
        m = self.ema_momentum(step)
        for online, target in pairs:
            update_momentum(online, target, m)
        if self._log_step():  # a Python number: copied to the device only when the loggers write it
            self.log("train/ema_momentum", m, on_step=True, on_epoch=False)

    def ema_momentum(self, step: int) -> float:
        """Constant ``momentum``, or cosine from ``momentum`` to ``momentum_end`` over training (BYOL)."""
        h = self.hparams
        return h.momentum if h.momentum_end is None else schedules.cosine_schedule(
            step, self.trainer.estimated_stepping_batches, h.momentum, h.momentum_end)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_nonfinite()  # before anything is written: a checkpoint after a bad step never replaces a good one
        checkpoint["skipped_steps"] = self.skipped_steps
        if self.run_config is not None:  # plain values: a checkpoint can rebuild its model (a BEiT tokenizer)
            checkpoint["config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    # ---- optimizer ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weight decay on weights only: biases and norm parameters (ndim <= 1) get none (and no LARS
        adaptation). Subclasses may split further with :func:`decay_groups` (e.g. a fixed-LR predictor)."""
        return optim.decay_groups(self.parameters())

    def warmup_steps(self, epochs: float, what: str) -> int:
        """``epochs`` of ``what`` in optimizer steps, capped at half the run (:func:`src.nn.schedules.warmup_steps`)."""
        return schedules.warmup_steps(epochs, int(self.trainer.estimated_stepping_batches), self.trainer.max_epochs, what,
                            rank_zero_info)

    def effective_batch_size(self) -> int:
        return self.trainer.datamodule.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        """The configured optimizer over :meth:`param_groups` at the lr scaled by the effective batch, with a warm-up
        + cosine schedule per step (:mod:`src.nn.optim`); logs the scaled lr."""
        h, t, base_lr = self.hparams, self.trainer, self.optimizer_factory.keywords["lr"]
        batch = self.effective_batch_size()
        lr, scale = optim.scaled_lr(base_lr, batch, h.reference_batch_size, h.lr_scaling)
        # Lightning cannot clip gradients that a fused optimizer unscales itself
        fused_ok = not (t.gradient_clip_val and str(t.precision) == "16-mixed")
        optimizer = optim.build_optimizer(self.optimizer_factory, self.param_groups(), lr, h.weight_decay_end, fused_ok)
        total, warmup = int(t.estimated_stepping_batches), self.warmup_steps(h.warmup_epochs, "warm-up")
        rank_zero_info(f"effective batch {batch}: lr = {base_lr} x {scale:.4g} ({h.lr_scaling} scaling, reference "
                       f"{h.reference_batch_size}) = {lr:.4g}; {total} steps, {warmup} warm-up")
        self.scaled_lr = lr
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.schedule_lambdas(optimizer, total, warmup,
                                                                                       h.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- config rules checked before training -----------------------------------------------------
    min_global_batch = 2  # contrastive losses need at least one negative
    min_views = 2  # views per image the loss compares (pretext tasks need one)

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        """One line per problem with a method's own rules (queue sizes, grid sizes, colour data) in the composed
        ``cfg``; the rules every method shares (``min_global_batch``, ``min_views``) are in :mod:`src.config.rules`."""
        return []
