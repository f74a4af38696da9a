"""Online linear probe trained alongside the method on detached, frozen features.

Two sources of features (``features``): ``train_view`` reuses the detached backbone features of the first
training view that the method computed in its own step (:attr:`SSLMethod.first_view_features`, the common
practice in solo-learn and lightly; no extra forward pass), ``eval_pass`` runs the backbone a second time in
eval mode on ``eval_view(batch["image"])`` (un-augmented images, BatchNorm running statistics; costs a
forward pass per batch). Methods whose step never computes plain features of a view (pretext tasks on
rotated/tiled/Lab inputs, MAE and BEiT on masked tokens) fall back to ``eval_pass``, said once in the log.
The default is ``eval_pass``: on the default run both give the same method, train_view costs 3% of a step instead
of 16%, but its accuracy reads 15 points lower (48.5 vs 63.8 online_val_top1; docs/results.md).

Logs ``eval/online_train_top1`` (accuracy of the probe on the training batches it was trained on during the
epoch) every epoch and ``eval/online_val_top1`` (on ``datamodule.eval_val_dataloader()``) every
``val_every_n_epochs`` epochs; the latest values are kept in ``self.metrics`` under the same keys.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from src.callbacks import labels_available
from src.protocols.features import eval_mode, extract_features


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


FEATURES = ("train_view", "eval_pass")


class OnlineLinearProbe(L.Callback):
    """``nn.Linear(D, num_classes)`` with its own AdamW, fitted on the first training view's detached features
    (``features="train_view"``) or on an eval-mode pass over ``eval_view(batch["image"])`` (``"eval_pass"``).

    The probe is not a submodule of the method, so the method's optimizer and checkpoint weights never see it;
    its state (weights and optimizer) is saved through the callback ``state_dict``. Features are computed with
    the method in eval mode under ``no_grad`` (train flags restored, BatchNorm statistics untouched). The probe
    starts at zero and, under DDP, its gradients are averaged over ranks, so all ranks hold the same probe.
    Items labelled -1 (unknown) contribute nothing; unlabelled datasets are skipped entirely. With
    ``train_view`` the step needs no host-device synchronisation (unknown labels and non-finite feature rows,
    e.g. of a step skipped for a non-finite loss, get zero weight instead of being selected).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        val_every_n_epochs: int = 1,
        max_val_items: int | None = None,
        features: str = "eval_pass",
    ):
        if features not in FEATURES:
            raise ValueError(f"eval.online_probe.features={features!r}; allowed: {', '.join(FEATURES)}")
        self.features = features
        self._fallback_said = False
        self.lr, self.weight_decay = lr, weight_decay
        self.val_every_n_epochs, self.max_val_items = val_every_n_epochs, max_val_items
        self.probe: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.metrics: dict[str, float] = {}
        self._pending_state: dict[str, Any] | None = None
        self._correct = self._seen = None

    def _active(self, trainer: L.Trainer) -> bool:
        return labels_available(trainer, self, "online probe")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        dims = (pl_module.feature_dim, trainer.datamodule.num_classes)
        self.probe = nn.utils.skip_init(nn.Linear, *dims, device=pl_module.device)
        nn.init.zeros_(self.probe.weight)  # deterministic, identical on every rank, no global RNG use
        nn.init.zeros_(self.probe.bias)
        try:  # fused: the step count stays on the device, so a step reads nothing back from it (GPU fast path)
            self.optimizer = torch.optim.AdamW(self.probe.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                               fused=True)
        except (RuntimeError, ValueError):  # a device without the fused kernel
            self.optimizer = torch.optim.AdamW(self.probe.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._correct = torch.zeros((), device=pl_module.device, dtype=torch.long)
        self._seen = torch.zeros((), device=pl_module.device, dtype=torch.long)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.probe is None:
            return
        feats = None
        if self.features == "train_view":
            feats = getattr(pl_module, "first_view_features", None)  # this batch's own (the method resets them)
            if feats is not None and (feats.shape[0] != batch["label"].shape[0]
                                      or feats[:1].flatten(1).shape[1] != self.probe.in_features):
                feats = None  # not the representation evaluation reads (e.g. a method with its own feature_dim)
            if feats is None and not self._fallback_said:
                rank_zero_info(f"online probe: {type(pl_module).__name__} computes no plain features of a training "
                               "view in its step; the probe runs its own eval-mode pass instead (features=eval_pass)")
                self._fallback_said = True
        if self._seen is None:  # a mid-epoch resume skips on_train_epoch_start
            self.on_train_epoch_start(trainer, pl_module)
        if feats is not None:
            self._train_on_view(pl_module, feats, batch["label"])
        else:
            self._train_on_eval_pass(trainer, pl_module, batch)

    def _train_on_view(self, pl_module: L.LightningModule, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on the step's own first-view features, without a host-device synchronisation."""
        feats = feats.flatten(1).float()
        keep = (labels >= 0) & torch.isfinite(feats).all(1)  # N
        feats = torch.where(keep[:, None], feats, torch.zeros((), device=feats.device))
        self.optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            logits = self.probe(feats)
            losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            (torch.where(keep, losses, 0.0).sum() / keep.sum().clamp(min=1)).backward()
        self._correct += ((logits.detach().argmax(1) == labels) & keep).sum()
        self._seen += keep.sum()
        self._step()

    def _train_on_eval_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        """One step on features of a second, eval-mode pass over the labelled images of the batch."""
        labels = batch["label"]
        keep = labels >= 0
        if not _distributed() and not bool(keep.any()):
            return
        images, labels = batch["image"][keep], labels[keep]
        self.optimizer.zero_grad(set_to_none=False)
        if images.shape[0] > 0:
            with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
                feats = pl_module(pl_module.views.eval_view(images))
            with torch.enable_grad():
                logits = self.probe(feats.flatten(1).float())
                F.cross_entropy(logits, labels).backward()
            self._correct += (logits.detach().argmax(1) == labels).sum()
            self._seen += labels.numel()
        self._step()

    def _step(self) -> None:
        if _distributed():  # every rank reaches this point on every batch, so the collective cannot hang
            world = dist.get_world_size()
            for p in self.probe.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= world
        self.optimizer.step()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe is None or self._seen is None:
            return
        stats = trainer.strategy.reduce(torch.stack([self._correct, self._seen]).float(), reduce_op="sum")
        if stats[1] > 0:
            self._log(pl_module, "eval/online_train_top1", float(stats[0] / stats[1] * 100.0))
        if (trainer.current_epoch + 1) % self.val_every_n_epochs == 0:
            self._log(pl_module, "eval/online_val_top1", self.evaluate(trainer, pl_module))

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """Top-1 (percent) of the current probe on the eval-val split (not sharded: same on every rank)."""
        feats, labels = extract_features(
            pl_module,
            pl_module.views,
            trainer.datamodule.eval_val_dataloader(),
            pl_module.device,
            self.max_val_items,
            trainer.precision_plugin.forward_context,
        )
        if labels.numel() == 0:
            return 0.0
        correct = 0
        for i in range(0, feats.shape[0], 4096):
            logits = self.probe(feats[i : i + 4096].to(pl_module.device))
            correct += int((logits.argmax(1).cpu() == labels[i : i + 4096]).sum())
        return correct / labels.numel() * 100.0

    def _log(self, pl_module: L.LightningModule, name: str, value: float) -> None:
        self.metrics[name] = value
        # identical on every rank; sync_dist (a mean of equal values) only keeps Lightning's DDP warning quiet
        pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None:
            return {}
        return {
            "probe": self.probe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "metrics": dict(self.metrics),
            "epoch_counts": [int(self._correct or 0), int(self._seen or 0)],  # this epoch's accuracy so far
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.probe is None:  # checkpoint restored before on_fit_start: apply once the probe exists
            self._pending_state = state_dict
            return
        self.probe.load_state_dict(state_dict["probe"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.metrics = dict(state_dict.get("metrics", {}))
        correct, seen = state_dict.get("epoch_counts", (0, 0))
        self._correct, self._seen = (torch.tensor(v, device=self.probe.weight.device) for v in (correct, seen))
        self._pending_state = None
