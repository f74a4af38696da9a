"""SSLMethod: the plumbing every method shares, so a method file only says what its paper says.

A subclass writes ``training_loss(views) -> loss`` or ``(loss, {name: value})`` and, if it has a
teacher, ``momentum_pairs() -> [(online, target), ...]``. The base turns raw uint8 batches into views
on the device, logs, builds the optimizer (no weight decay on norms and biases, LR scaled by the
effective batch), steps a warm-up + cosine schedule per optimizer step (and an optional cosine weight
decay schedule) and updates EMA targets once per optimizer step (so gradient accumulation is safe).

Multi-crop: ``views`` may hold views of several sizes (the recipe's groups in order). The leading views
with the size of the first one are the global views; :meth:`embed` runs the backbone once per run of
equal-sized views and the head once over all of them; :func:`view_pairs` lists which views to compare.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed import ReduceOp

from src.nn.ema import update_momentum
from src.nn.multicrop import size_runs
from src.nn.nonfinite import NonFiniteWatch
from src.nn.optim import compile_unavailable, decay_groups, fusable
from src.nn.schedules import cosine_schedule, warmup_cosine
from src.utils.errors import UserError
from src.utils.hashing import stable_hash

NONFINITE = ("stop", "skip")


class NonFiniteLossError(UserError):
    """Raised when the loss is NaN/inf; the last good checkpoint stays untouched."""


class SSLMethod(L.LightningModule):
    def __init__(self, backbone: nn.Module, views: nn.Module, optimizer: Callable[..., torch.optim.Optimizer],
                 warmup_epochs: float = 10, min_lr_ratio: float = 0.0, lr_scaling: str = "linear",
                 reference_batch_size: int = 256, momentum: float = 0.996, momentum_end: float | None = None,
                 weight_decay_end: float | None = None, channels_last: bool = False, nonfinite_loss: str = "stop",
                 compile: bool = False):
        super().__init__()
        if lr_scaling not in {"linear", "sqrt", "none"}:
            raise UserError(f"method.lr_scaling={lr_scaling!r}; allowed: linear, sqrt, none")
        if nonfinite_loss not in NONFINITE:
            raise UserError(f"nonfinite_loss={nonfinite_loss!r}; allowed: {', '.join(NONFINITE)}")
        self.save_hyperparameters(ignore=["backbone", "views", "optimizer"])
        self.backbone = backbone
        self.views = views
        self.optimizer_factory = optimizer
        self.skipped_steps = 0  # steps dropped for a non-finite loss (nonfinite_loss=skip); checkpointed
        self.run_config: dict | None = None  # the run's resolved backbone/views/method/data config (src/train.py)
        self._skipping = False
        self.batch_arrived: float | None = None  # host clock when the last training batch reached the device
        self._nonfinite = NonFiniteWatch()  # nonfinite_loss=stop: bad losses noted on the device (src/nn/nonfinite.py)

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
        """Parameters whose gradient is dropped at this step (DINO's last layer in epoch 0, SwAV's
        prototypes in the first iterations); they still take part in the forward pass."""
        return []

    # ---- features (what evaluation reads) ---------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        """Width of :meth:`forward`'s features, the representation evaluation measures."""
        return self.backbone.out_dim

    @property
    def feature_network(self) -> nn.Module:
        """The module whose forward alone gives :meth:`forward`'s features (what fine-tuning trains): the backbone,
        unless a method's forward adds a step of its own (colorization reads the lightness channel)."""
        return self.backbone if type(self).forward is SSLMethod.forward else self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    # The online probe's cheap input (eval.online_probe.features=train_view): the detached backbone features of
    # the first view of the current training batch (N x D), set by embed's online pass; None until then. Methods
    # that never call embed leave it None, and the probe falls back to its own eval-mode pass.
    first_view_features: torch.Tensor | None = None

    def embed(self, views: list[torch.Tensor], head: nn.Module | None = None,
              backbone: nn.Module | None = None) -> list[torch.Tensor]:
        """Per-view outputs of ``head(backbone(view))``. Consecutive views of one size go through the
        backbone as one batch; the head (with its BatchNorm) sees all views at once. The online backbone's
        (``backbone=None``) features of the first view are kept, detached, in :attr:`first_view_features`."""
        online = backbone is None
        backbone = backbone if backbone is not None else self.forward
        out = torch.cat([backbone(torch.cat(views[run])) for run in size_runs(views)])  # V N x D
        if online:
            self.first_view_features = out[: views[0].shape[0]].detach()  # N x D: the first view's rows
        out = head(out) if head is not None else out
        return list(out.chunk(len(views)))

    def configure_model(self) -> None:
        """``compile=True``: the online backbone's forward goes through ``torch.compile`` (inductor) from the first
        step on; its parameters and state-dict keys stay the same (``nn.Module.compile`` compiles in place)."""
        if self.hparams.compile and not getattr(self.backbone, "_compiled_call_impl", None):
            if why := compile_unavailable(self.trainer.strategy.root_device):
                raise UserError(f"method.compile=true: {why}; set method.compile=false")
            self.backbone.compile()

    # ---- views on the device --------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is None or not self.trainer.training:
            return batch
        self.batch_arrived = time.perf_counter()  # the step starts here: making views is training (throughput.py)
        torch.manual_seed(self.batch_seed())
        images, labels = batch[0], batch[1]
        out = {"views": self.make_views(images), "image": images, "label": labels}
        if len(batch) > 2:  # image–text data: the captions' tokens (B, L)
            out["text"] = batch[2]
        return out

    def make_views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The training views of a uint8 batch on the device, laid out as the backbone wants them."""
        views = self.views(images)
        if self.hparams.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def batch_seed(self) -> int:
        """The seed of this training batch's randomness (views, MoCo's shuffle, pretext labels): a function of
        the run's seed, the rank, the epoch and the batch's index in it alone. A resumed run therefore draws
        what an uninterrupted one would have (no RNG state to save), and every rank draws differently."""
        t = self.trainer
        index = t.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch started before it
        key = (int(os.environ.get("PL_GLOBAL_SEED", 0)), t.global_rank, t.current_epoch, index)
        return stable_hash(*key) % 2**63

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """The loss of the batch, with no host-device sync under ``nonfinite_loss=stop``: a non-finite loss is noted
        on the device and read back at the check points of :meth:`check_nonfinite`. ``nonfinite_loss=skip`` must
        decide before the optimizer step, so it reads the loss's finiteness (and reduces it over the ranks) every
        step: one sync per step."""
        skip = self.hparams.nonfinite_loss == "skip"  # then a skipped step must leave no trace in the buffers
        saved = [b.detach().clone() for b in self.buffers()] if skip else []  # BatchNorm statistics, queues, ...
        out = self.batch_loss(batch)
        loss, logs = out if isinstance(out, tuple) else (out, {})
        bs = batch["image"].shape[0]
        if skip:  # every rank takes the same decision (a rank that skipped its backward alone would hang DDP)
            self._skipping = self.trainer.strategy.reduce_boolean_decision(not bool(torch.isfinite(loss)), all=False)
        else:
            self._nonfinite.note(loss, logs, self.global_step)
        if self._skipping:
            with torch.no_grad():
                for buffer, value in zip(self.buffers(), saved, strict=True):
                    buffer.copy_(value)
            for module in self.modules():  # e.g. a feature queue's host copy of its write position
                if hasattr(module, "buffers_restored"):
                    module.buffers_restored()
            self.skipped_steps += 1
            rank_zero_warn(f"{self._nonfinite_words(loss, logs)}: step skipped ({self.skipped_steps} so far)")
            self.log("train/skipped_steps", float(self.skipped_steps), batch_size=bs)
            return None  # Lightning runs no backward; the optimizer finds no gradients and changes nothing

        # a progress-bar value is read back (.item()) after every batch: only on the CPU, where that costs nothing
        self.log("train/loss", loss, prog_bar=self.device.type == "cpu", batch_size=bs)
        for k, v in logs.items():  # a pretext task's accuracy is also averaged over each epoch (for results)
            epoch = k == "pretext_acc"
            self.log(f"train/{k}", v, batch_size=bs, on_epoch=epoch, sync_dist=epoch)
        if self._log_step():  # a Python number is copied to the device: only when the loggers write it
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def _nonfinite_words(self, loss: torch.Tensor, logs: dict) -> str:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items())
        return f"non-finite loss {float(loss)} at step {self.global_step}" + (f" ({terms})" if terms else "")

    def _log_step(self) -> bool:
        """Whether the loggers write this batch's step metrics (Lightning's rule: every ``log_every_n_steps``)."""
        return self.trainer._logger_connector.should_update_logs

    def check_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` naming the first step whose loss was not finite (on any rank), if
        there was one. One reduce over the ranks and one host-device sync; called at every logging step, at the
        last batch of each epoch (before the epoch's evaluation) and before any checkpoint is written, so no
        checkpoint holds weights trained on a non-finite loss and the last good ``last.ckpt`` stays."""
        if self.hparams.nonfinite_loss != "stop" or self._trainer is None:
            return
        reduce_min = lambda t: self.trainer.strategy.reduce(t, reduce_op=ReduceOp.MIN)  # noqa: E731
        step = self._nonfinite.first_bad_step(reduce_min if self.trainer.world_size > 1 else lambda t: t)
        if step is not None:
            raise NonFiniteLossError(f"{self._nonfinite.describe(step)}; lower method.optimizer.lr or check the data "
                                     "(or set nonfinite_loss=skip); the last good checkpoint is kept")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._log_step() or batch_idx + 1 >= self.trainer.num_training_batches:
            self.check_nonfinite()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Cosine weight-decay schedule (DINO): ``weight_decay`` -> ``weight_decay_end`` over training."""
        end = self.hparams.weight_decay_end
        if end is None:
            return
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("wd_schedule"):
                group["weight_decay"] = cosine_schedule(self.trainer.global_step, self.trainer.estimated_stepping_batches,
                                                        group["wd_start"], end)

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
        if self.hparams.momentum_end is None:
            return self.hparams.momentum
        return cosine_schedule(step, self.trainer.estimated_stepping_batches, self.hparams.momentum,
                               self.hparams.momentum_end)

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
        return decay_groups(self.parameters())

    def warmup_steps(self, epochs: float, what: str) -> int:
        """``epochs`` of warm-up in optimizer steps, capped at half the run (e.g. the paper's 10 warm-up
        epochs in a 5-epoch CPU run), with a logged line when capped."""
        total = int(self.trainer.estimated_stepping_batches)
        steps = int(epochs * max(total // max(self.trainer.max_epochs, 1), 1))
        if steps > total // 2:
            rank_zero_info(f"{what} of {epochs} epochs is more than half of this {self.trainer.max_epochs}-epoch "
                           f"run; using {total // 2} steps instead")
            steps = total // 2
        return steps

    def effective_batch_size(self) -> int:
        t = self.trainer
        return t.datamodule.batch_size * t.world_size * t.accumulate_grad_batches

    def configure_optimizers(self):
        base_lr = self.optimizer_factory.keywords["lr"]
        wd = self.optimizer_factory.keywords.get("weight_decay", 0.0)
        batch = self.effective_batch_size()
        ratio = batch / self.hparams.reference_batch_size
        scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.hparams.lr_scaling]
        lr = base_lr * scale
        groups = self.param_groups()
        for group in groups:
            if "weight_decay" not in group and self.hparams.weight_decay_end is not None:
                group.update(wd_schedule=True, wd_start=wd)  # groups without their own weight decay follow it
            if "lr_ratio" in group:  # e.g. Barlow Twins' biases and norms at 0.024 x the weights' lr
                group["lr"] = lr * group.pop("lr_ratio")
        fused = fusable(self.optimizer_factory, [p for g in groups for p in g["params"]])
        if fused and self.trainer.gradient_clip_val and str(self.trainer.precision) == "16-mixed":
            fused = False  # Lightning cannot clip gradients that a fused optimizer unscales itself
        optimizer = self.optimizer_factory(groups, lr=lr, **({"fused": True} if fused else {}))
        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.warmup_steps(self.hparams.warmup_epochs, "warm-up")
        rank_zero_info(f"effective batch {batch}: lr = {base_lr} x {scale:.4g} ({self.hparams.lr_scaling} "
                       f"scaling, reference {self.hparams.reference_batch_size}) = {lr:.4g}; "
                       f"{total} steps, {warmup} warm-up")
        self.scaled_lr = lr
        min_ratio = self.hparams.min_lr_ratio
        lambdas = [(lambda s: 1.0) if g.get("fixed_lr") else (lambda s: warmup_cosine(s, total, warmup, min_ratio))
                   for g in optimizer.param_groups]  # fixed_lr: e.g. SimSiam's predictor
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- config rules checked before training -----------------------------------------------------
    min_global_batch = 2  # contrastive losses need at least one negative
    min_views = 2  # views per image the loss compares (pretext tasks need one)

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        """One line per problem with this method in the composed config ``cfg``; extended by methods with
        extra rules (queue sizes, grid sizes, colour data)."""
        problems = []
        if global_batch < cls.min_global_batch:
            problems.append(f"data.batch_size gives a global batch of {global_batch}, too small for "
                            f"{cls.__name__}'s loss (needs >= {cls.min_global_batch}); raise data.batch_size")
        if num_views < cls.min_views:
            problems.append(f"{cls.__name__} needs {cls.min_views} views per image but views give {num_views}; "
                            f"set views.crops[0].num={cls.min_views}")
        scaling = cfg.method.get("lr_scaling", "linear")
        if scaling not in ("linear", "sqrt", "none"):
            problems.append(f"method.lr_scaling={scaling} is not allowed; use linear, sqrt or none")
        return problems
