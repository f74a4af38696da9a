"""Final frozen-feature evaluation: weighted kNN and a linear probe, optionally against a random-init baseline.

Runs once in ``on_train_end`` (not ``on_fit_end``: by then Lightning has already moved the module to the CPU).
``self.results`` holds plain floats in percent rounded to 2 decimals:
``knn_top1, linear_top1, linear_top5``; with ``holdout_fraction`` > 0 the same two measures with a seeded
random part of the labelled *training* split as queries and the rest as bank / probe data (``val_knn_top1,
val_linear_top1, val_linear_top5, eval_holdout_items``: what sweeps optimise, so no choice looks at the test
split); with a ``random_backbone`` factory,
``random_knn_top1, random_linear_top1, random_linear_top5``; plus ``eval_train_split, eval_val_split``
(names) and ``eval_train_items, eval_val_items`` (counts). Numeric results are logged as ``eval/<key>`` to
every logger. Unlabelled data: ``self.results == {"eval_skipped": "data has no labels"}``.
``protocols`` names more protocols of :mod:`src.protocols` to run afterwards (``eval.final.protocols=[knn, fewshot]``,
settings from ``protocols.<name>``, built by :func:`src.train.build_callbacks`): their figures (and the random-init
baseline's, ``random_*``) join ``self.results``, each writes ``<run>/checkpoints/last.<tag>.json`` and pictures go to
``<run>/pictures/<what>_<epoch>.png`` and W&B.
Every rank computes the same thing (eval loaders are not sharded); loggers only write on rank 0.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from src.callbacks import labels_available
from src.nn.knn import knn_top1
from src.nn.linear_probe import train_linear_probe
from src.protocols import Protocol
from src.protocols.features import extract_features, own_rng


def holdout_split(features: tuple[torch.Tensor, torch.Tensor], fraction: float, seed: int) -> tuple[tuple, tuple]:
    """((features, labels) kept, (features, labels) held out): a seeded random ``fraction`` of the labelled
    training split, for ``val_*`` results that never look at the test split."""
    x, y = features
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n = max(1, int(round(fraction * x.shape[0])))
    return (x[order[n:]], y[order[n:]]), (x[order[:n]], y[order[:n]])


class FinalEvaluation(L.Callback):
    final = True  # an end-of-training evaluation: src/train.py runs it for a run resumed after its last epoch

    def __init__(
        self,
        random_backbone: Callable[[], nn.Module] | None = None,
        k: int = 200,
        temperature: float = 0.07,
        linear_epochs: int = 100,
        linear_lr: float = 1.0,
        linear_weight_decay: float = 1e-3,
        max_train_items: int | None = None,
        max_val_items: int | None = None,
        holdout_fraction: float = 0.0,
        seed: int = 0,
        protocols: list[str] = (),
        protocol_settings: dict | None = None,
    ):
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"eval.final.holdout_fraction={holdout_fraction} must be in [0, 1)")
        self.holdout_fraction = holdout_fraction
        self.random_backbone = random_backbone
        self.k, self.temperature = k, temperature
        self.linear_epochs, self.linear_lr, self.linear_weight_decay = (
            linear_epochs,
            linear_lr,
            linear_weight_decay,
        )
        self.max_train_items, self.max_val_items, self.seed = max_train_items, max_val_items, seed
        self.results: dict[str, Any] = {}
        settings = protocol_settings or {}  # Hydra builds the protocols.<name> nodes passed through it already
        self.protocols = [p if isinstance(p := settings[name], Protocol) else instantiate(p) for name in protocols]

    def _scores(
        self, train: tuple, val: tuple, num_classes: int, device: torch.device, prefix: str
    ) -> dict[str, float]:
        (tx, ty), (vx, vy) = [(f.to(device), y.to(device)) for f, y in (train, val)]
        knn = knn_top1(tx, ty, vx, vy, num_classes, self.k, self.temperature)
        lin = train_linear_probe(
            tx,
            ty,
            vx,
            vy,
            num_classes,
            self.linear_epochs,
            self.linear_lr,
            self.linear_weight_decay,
            seed=self.seed,
        )
        return {
            f"{prefix}knn_top1": knn,
            f"{prefix}linear_top1": lin["top1"],
            f"{prefix}linear_top5": lin["top5"],
        }

    def _random_features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[nn.Module, tuple, tuple]:
        """Build and evaluate the random baseline without touching the global RNG stream: (model, train, val)."""
        device, dm = pl_module.device, trainer.datamodule
        ctx = trainer.precision_plugin.forward_context
        with own_rng(self.seed, device):
            backbone = self.random_backbone().to(device)
            train = extract_features(backbone, pl_module.views, dm.eval_train_dataloader(), device,
                                          self.max_train_items, ctx)
            val = extract_features(backbone, pl_module.views, dm.eval_val_dataloader(), device,
                                        self.max_val_items, ctx)
        return backbone, train, val

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if not labels_available(trainer, self, "final evaluation"):
            self.results = {"eval_skipped": "data has no labels"}
            return
        ctx, device = trainer.precision_plugin.forward_context, pl_module.device
        train = extract_features(pl_module, pl_module.views, dm.eval_train_dataloader(), pl_module.device, self.max_train_items, ctx)
        val = extract_features(pl_module, pl_module.views, dm.eval_val_dataloader(), pl_module.device, self.max_val_items, ctx)
        scores = self._scores(train, val, dm.num_classes, device, "")
        held = None
        if self.holdout_fraction > 0:  # held-out training data: what sweeps and model choices may look at
            rest, held = holdout_split(train, self.holdout_fraction, self.seed)
            scores.update(self._scores(rest, held, dm.num_classes, device, "val_"))
        random = None
        if self.random_backbone is not None:
            random = self._random_features(trainer, pl_module)
            scores.update(self._scores(*random[1:], dm.num_classes, device, "random_"))
        train_split, val_split = getattr(dm, "eval_split_names", ("train", "val"))
        self.results = {key: round(float(v), 2) for key, v in scores.items()}
        self.results.update(
            eval_train_split=train_split,
            eval_val_split=val_split,
            eval_train_items=int(train[0].shape[0]),
            eval_val_items=int(val[0].shape[0]),
        )
        if held is not None:
            self.results["eval_holdout_items"] = int(held[0].shape[0])
        if self.protocols:
            self.results.update(self._run_protocols(trainer, pl_module, (train, val), random))
        metrics = {f"eval/{k}": v for k, v in self.results.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(f"final evaluation: {self.results}")

    def _run_protocols(self, trainer: L.Trainer, pl_module: L.LightningModule, features: tuple,
                       random: tuple | None) -> dict[str, Any]:
        """The extra protocols on the trained method and on the random-init one (``random``: its model and features),
        starting from the features extracted above (not extracted again); files on rank 0 only."""
        from src.protocols import Subject, run_protocols

        run_dir = Path(trainer.default_root_dir)
        epoch = trainer.current_epoch  # training has ended: the epochs done
        main = trainer.is_global_zero

        def subject(model, name: str, known: tuple) -> Subject:
            cache = {("train", self.max_train_items): known[0], ("val", self.max_val_items): known[1]}
            return Subject(model, pl_module.views, trainer.datamodule, pl_module.device, self.seed,
                           out_dir=run_dir / "checkpoints" if main else None,
                           pictures=(lambda what: run_dir / "pictures" / f"{what}_{epoch:04d}.png") if main else None,
                           publish=lambda what, image, caption: [
                               lg.log_image(key=what, images=[image], caption=[caption], step=trainer.global_step)
                               for lg in trainer.loggers if isinstance(lg, WandbLogger)],
                           forward_context=trainer.precision_plugin.forward_context, name=name, cache=cache)

        baseline = (lambda: subject(random[0], "random", random[1:])) if random is not None else None
        out = (lambda tag: run_dir / "checkpoints" / f"last.{tag}.json") if main else None
        return run_protocols(self.protocols, subject(pl_module, "trained", features), baseline, out)
