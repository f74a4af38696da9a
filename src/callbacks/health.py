"""Representation health during training: is the backbone collapsing?

Every ``every_n_epochs`` epochs and after the last one (``None``: the last one only), on up to ``max_items``
evenly spaced images of the evaluation split (the training set without one), in eval mode and on its own random
streams: the per-dimension std ratio and RankMe of the backbone features, and the alignment between two views made
by the method's own recipe (when it makes two) and the uniformity (src/nn/health.py). Logged as ``eval/health_*``.

A collapse (std ratio under ``collapse_std_ratio`` or RankMe under ``collapse_rank``) is said once in one warning
line; ``self.results`` records the last values, ``collapsed`` and, if so, ``collapsed_at_epoch``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from src.callbacks.pictures import held_out_images
from src.nn.health import alignment, rankme, std_ratio, uniformity
from src.protocols.features import eval_mode, own_rng


class RepresentationHealth(L.Callback):
    def __init__(self, every_n_epochs: int | None = 1, max_items: int = 1000, collapse_std_ratio: float = 0.05,
                 collapse_rank: float = 2.0, seed: int = 0):
        if (every_n_epochs is not None and every_n_epochs < 1) or max_items < 2:
            raise ValueError(f"eval.health: every_n_epochs={every_n_epochs} must be >= 1 and max_items={max_items} >= 2")
        self.every_n_epochs, self.max_items, self.seed = every_n_epochs, max_items, seed
        self.collapse_std_ratio, self.collapse_rank = collapse_std_ratio, collapse_rank
        self.results: dict[str, Any] = {}

    @torch.no_grad()
    def figures(self, pl_module: L.LightningModule, images: torch.Tensor) -> dict[str, float]:
        images = images.to(pl_module.device)
        with eval_mode(pl_module), own_rng(self.seed, pl_module.device):
            z = torch.cat([pl_module(pl_module.views.eval_view(chunk)).flatten(1) for chunk in images.split(256)])
            out = {"health_std_ratio": std_ratio(z), "health_rankme": rankme(z), "health_uniformity": uniformity(z)}
            views = pl_module.views(images)  # the method's own augmentations, for the alignment of positive pairs
            if len(views) >= 2 and views[0].shape == views[1].shape:
                z1, z2 = (torch.cat([pl_module(c).flatten(1) for c in v.split(256)]) for v in views[:2])
                out["health_alignment"] = alignment(z1, z2)
        return out

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not (epoch == trainer.max_epochs or (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0)):
            return
        values = self.figures(pl_module, held_out_images(trainer, self.max_items))
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in values.items()}, step=trainer.global_step)
        collapsed = values["health_std_ratio"] < self.collapse_std_ratio or values["health_rankme"] < self.collapse_rank
        first = self.results.get("collapsed_at_epoch")  # a collapse stays on record once seen
        self.results = {**{k: round(v, 4) for k, v in values.items()}, "collapsed": bool(first) or collapsed}
        if first is not None:
            self.results["collapsed_at_epoch"] = first
        elif collapsed:
            self.results["collapsed_at_epoch"] = epoch
            rank_zero_warn(f"representation collapse at epoch {epoch}: per-dimension std x sqrt(d) = "
                           f"{values['health_std_ratio']:.3f} (healthy about 1), RankMe {values['health_rankme']:.2f} "
                           f"of {pl_module.feature_dim} dimensions; lower the learning rate or check the method's settings")

    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))
