"""Periodic weighted-kNN evaluation of the method's frozen features.

Every ``every_n_epochs`` training epochs, features of the eval-train split form the bank and features of the
eval-val split are classified by :func:`src.protocols.frozen.knn_score` (the final evaluation's kNN). Logs ``eval/knn_top1`` (percent) and keeps the
latest value in ``self.metrics["eval/knn_top1"]``. Unlabelled datasets are skipped (said once).
"""

from __future__ import annotations

import lightning as L

from src.callbacks import labels_available
from src.protocols.features import autocast_context, extract_features
from src.protocols.frozen import knn_score


class KNNMonitor(L.Callback):
    def __init__(
        self,
        every_n_epochs: int = 1,
        k: int = 200,
        temperature: float = 0.07,
        max_train_items: int | None = None,
        max_val_items: int | None = None,
    ):
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self.max_train_items, self.max_val_items = max_train_items, max_val_items
        self.metrics: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        dm = trainer.datamodule
        if not labels_available(trainer, self, "kNN monitor"):
            return
        ctx = autocast_context(trainer.precision, pl_module.device)
        bank, bank_y = extract_features(pl_module, pl_module.views, dm.eval_train_dataloader(), pl_module.device, self.max_train_items, ctx)
        query, query_y = extract_features(pl_module, pl_module.views, dm.eval_val_dataloader(), pl_module.device, self.max_val_items, ctx)
        if bank.shape[0] == 0 or query.shape[0] == 0:
            return
        top1 = knn_score((bank, bank_y), (query, query_y), dm.num_classes, self.k, self.temperature, pl_module.device)
        self.metrics["eval/knn_top1"] = top1
        # identical on every rank (eval loaders are not sharded); sync_dist keeps Lightning's DDP warning quiet
        pl_module.log("eval/knn_top1", top1, on_step=False, on_epoch=True, sync_dist=True)
