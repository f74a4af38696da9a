"""The end of a training run's evaluation: *when* (once, in ``on_train_end``, on every rank); *how* is
:mod:`src.protocols` (the same code ``python -m src.eval CKPT`` runs, so both give the same figures).

It measures the trained method's frozen features (:class:`~src.protocols.frozen.FrozenEvaluation`: kNN, linear
probe, held-out ``val_*``), zero-shot and retrieval for models with a text tower
(:class:`~src.protocols.image_text.ImageText`, settings ``protocols.image_text``), then the protocols named in
``protocols`` (``eval.final.protocols=[knn, fewshot]``, settings ``protocols.<name>``); with a ``random_model``
factory, each beside a randomly initialised model of the same architecture (``random_*`` keys). ``self.results``
holds the figures (percent, 2 decimals) and ``eval_train_split, eval_val_split``; numeric ones are logged as
``eval/<key>`` to every logger. Protocols with files of their own write ``<run>/checkpoints/last.<tag>.json``;
pictures go to ``<run>/pictures/<what>_<epoch>.png`` and W&B. Unlabelled data: only image–text figures, and
``eval_skipped: "data has no labels"``. Runs in ``on_train_end`` (not ``on_fit_end``: by then Lightning has moved
the module to the CPU); loggers and files on rank 0 only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf
from torch import nn

from src.callbacks import labels_available
from src.protocols import Protocol, Subject, run_protocols
from src.protocols.features import autocast_context
from src.protocols.frozen import FrozenEvaluation
from src.protocols.image_text import ImageText


def final_protocols(frozen: FrozenEvaluation, names: list[str], settings: Mapping | None,
                    labelled: bool = True) -> list[Protocol]:
    """What a final evaluation runs, in order: the frozen-feature figures, image–text figures (for models with a text
    tower) and the named protocols (``settings[name]``: built protocols or their config nodes). Without labels only
    the image–text figures (retrieval needs no labels)."""
    settings = settings or {}
    built = [p if isinstance(p := settings[name], Protocol) else instantiate(p) for name in names]
    image_text = settings.get("image_text")
    image_text = image_text if isinstance(image_text, Protocol) else instantiate(image_text) if image_text else ImageText()
    return [frozen, image_text, *built] if labelled else [image_text]


class FinalEvaluation(L.Callback):
    final = True  # an end-of-training evaluation: src/train.py runs it for a run resumed after its last epoch

    def __init__(self, random_model: Callable[[], nn.Module] | None = None, k: int = 200, temperature: float = 0.07,
                 linear_epochs: int = 100, linear_lr: float = 1.0, linear_weight_decay: float = 1e-3,
                 max_train_items: int | None = None, max_val_items: int | None = None, holdout_fraction: float = 0.0,
                 seed: int = 0, protocols: list[str] = (), protocol_settings: Mapping | None = None):
        self.frozen = FrozenEvaluation(k, temperature, linear_epochs, linear_lr, linear_weight_decay, max_train_items,
                                       max_val_items, holdout_fraction, seed)
        self.random_model, self.seed = random_model, seed
        self.protocol_names, self.protocol_settings = list(protocols), protocol_settings
        self.protocols = final_protocols(self.frozen, self.protocol_names, protocol_settings)  # built (and checked) now
        self.results: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg, random_model: Callable[[], nn.Module] | None, node=None) -> FinalEvaluation | None:
        """The final evaluation ``node`` (default ``cfg.eval.final``) describes (None when it is off), with
        ``random_model`` as its baseline when ``random_baseline`` is on; protocols from ``cfg.protocols``, seed from
        ``cfg.seed``."""
        node = node if node is not None else (cfg.get("eval") or {}).get("final")
        if node is None:
            return None
        settings = OmegaConf.masked_copy(node, [k for k in node if k != "random_baseline"])
        return instantiate(settings, random_model=random_model if node.get("random_baseline") else None,
                           seed=cfg.seed, protocol_settings=cfg.get("protocols"))

    def evaluate(self, subject: Callable[[nn.Module, str], Subject], model: nn.Module, datamodule,
                 out: Callable[[str], Path] | None) -> dict[str, Any]:
        """The figures of ``model`` (and of the random-init baseline) on ``datamodule``'s splits, ``subject(model,
        name)`` saying how each is measured; the same for a run's end and for ``python -m src.eval CKPT``."""
        labelled = bool(getattr(datamodule, "has_labels", False))
        protocols = self.protocols if labelled else [p for p in self.protocols if isinstance(p, ImageText)]
        device = subject(model, "trained").device
        baseline = (lambda: subject(self.random_model().to(device), "random")) if self.random_model else None
        results = run_protocols(protocols, subject(model, "trained"), baseline, out)
        if labelled:
            results.update(eval_train_split=datamodule.eval_split_names[0], eval_val_split=datamodule.eval_split_names[1])
        else:
            results["eval_skipped"] = "data has no labels"
        return results

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        run_dir, epoch, main = Path(trainer.default_root_dir), trainer.current_epoch, trainer.is_global_zero

        def subject(model: nn.Module, name: str) -> Subject:
            return Subject(model, pl_module.views, dm, pl_module.device, self.seed,
                           out_dir=run_dir / "checkpoints" if main else None,
                           pictures=(lambda what: run_dir / "pictures" / f"{what}_{epoch:04d}.png") if main else None,
                           publish=lambda what, image, caption: [
                               lg.log_image(key=what, images=[image], caption=[f"epoch {epoch}, {caption}"],
                                            step=trainer.global_step)
                               for lg in trainer.loggers if isinstance(lg, WandbLogger)],
                           forward_context=autocast_context(trainer.precision, pl_module.device), name=name,
                           say=rank_zero_info)

        out = (lambda tag: run_dir / "checkpoints" / f"last.{tag}.json") if main else None
        labels_available(trainer, self, "final evaluation")  # says so once when there are none
        self.results = self.evaluate(subject, pl_module, dm, out)
        metrics = {f"eval/{k}": v for k, v in self.results.items() if isinstance(v, int | float)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"final evaluation: {self.results}")
