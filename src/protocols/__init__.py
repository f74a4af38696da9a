"""Evaluation protocols: kNN (a sweep of k), linear probes, fine-tuning with a label fraction, N-shot logistic
regression and embedding plots. Lightning-free; one implementation each, two callers: the final evaluation of a
training run (``eval.final.protocols=[...]``) and ``python -m src.eval CKPT protocol=<name>``.

A protocol is an object built from ``conf/protocol/<name>.yaml`` (its settings are ``protocols.<name>.*`` in the
run config) with ``run(subject) -> {key: value}``. The :class:`Subject` is what is measured: a feature extractor,
its views (the deterministic ``eval_view`` and the normalisation), the data module with its labelled splits, and
where files go. :func:`run_protocols` runs each protocol on the trained model and, beside it, on a randomly
initialised one of the same architecture (keys prefixed ``random_``), and writes ``<stem>.<tag>.json`` beside the
checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from src.protocols.features import eval_mode, extract_features, own_rng
from src.utils.io import write_json_atomic


@dataclass
class Subject:
    """A feature extractor ``model(views.eval_view(images)) -> (B, D)`` and the data it is measured on.

    ``out_dir`` is where a protocol keeps files beside its results (fine-tuning's subset lists); ``pictures(what)`` the
    file a picture of this subject goes to (``what`` such as ``tsne``); ``publish(what, image, caption)``, when given,
    also sends it to the run's loggers. Frozen features are computed once per split and size and shared by every
    protocol of one call (:meth:`features`).
    """

    model: nn.Module
    views: Any
    datamodule: Any
    device: torch.device
    seed: int = 0
    out_dir: Path | None = None
    pictures: Callable[[str], Path] | None = None
    publish: Callable[[str, torch.Tensor, str], None] | None = None
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = "trained"
    cache: dict = field(default_factory=dict, repr=False)  # (split, max_items) -> features a caller already has

    def features(self, split: str, max_items: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and labels (CPU) of ``split`` (``train`` or ``val``, the data's evaluation splits), at most
        ``max_items`` evenly spaced samples."""
        key = (split, max_items)
        if key not in self.cache:
            dm = self.datamodule
            loader = dm.eval_train_dataloader() if split == "train" else dm.eval_val_dataloader()
            self.cache[key] = extract_features(self.model, self.views, loader, self.device, max_items,
                                                     self.forward_context)
        return self.cache[key]

    @property
    def feature_dim(self) -> int:
        """Width of the features: the method's ``feature_dim`` or the backbone's ``out_dim``, else one image's pass."""
        for name in ("feature_dim", "out_dim"):
            if isinstance(width := getattr(self.model, name, None), int):
                return width
        image = torch.as_tensor(self.datamodule.eval_val[0][0])[None].to(self.device)
        with eval_mode(self.model), eval_mode(self.views), torch.no_grad():
            return int(self.model(self.views.eval_view(image)).flatten(1).shape[1])

    def files(self, name: str) -> Path | None:
        """``out_dir / name`` (None without an ``out_dir``: nothing is kept)."""
        return None if self.out_dir is None else Path(self.out_dir) / name

    def trainable_copy(self) -> nn.Module:
        """A copy of the feature extractor to train (fine-tuning): the backbone alone where the method's features are
        its backbone's (the usual case), else the whole model (e.g. colorization reads the lightness channel)."""
        from src.methods.base import SSLMethod

        model = self.model
        if isinstance(model, SSLMethod) and type(model).forward is SSLMethod.forward:
            model = model.backbone
        return copy.deepcopy(model).to(self.device)

    @property
    def num_classes(self) -> int:
        return int(self.datamodule.num_classes)


class Protocol(ABC):
    """Base of the protocols: ``name`` (the config option), ``tag`` (names its results file and prefixes its keys;
    e.g. ``finetune_1pct``) and :meth:`run`."""

    name = "protocol"

    @property
    def tag(self) -> str:
        return self.name

    @abstractmethod
    def run(self, subject: Subject) -> dict[str, Any]:
        """The protocol's figures on ``subject`` (keys prefixed with :attr:`tag`)."""

    def settings(self) -> dict[str, Any]:
        """The protocol's settings as plain values (written into its results file)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def run_protocols(protocols: list[Protocol], subject: Subject, random_subject: Callable[[], Subject] | None,
                  out: Callable[[str], Path] | None) -> dict[str, Any]:
    """Every protocol on ``subject`` and on ``random_subject()`` (a random-init model of the same architecture, built
    on its own RNG stream seeded like the final evaluation's baseline); each run draws from its own stream seeded
    with the subject's seed, so both models see the same subsets, episodes and crops, and the global RNG is left as
    it was. Keys of the baseline are prefixed ``random_``. ``out(tag)`` is the results file of a protocol (None:
    stdout only). Returns every key."""
    results: dict[str, Any] = {}
    baseline = None
    for protocol in protocols:
        start = time.time()
        with own_rng(subject.seed, subject.device):  # the same draws (subsets, episodes, crops) for both models
            scores = protocol.run(subject)
        random_scores: dict[str, Any] = {}
        if random_subject is not None:
            if baseline is None:
                with own_rng(subject.seed, subject.device):  # the final evaluation's random-init weights
                    baseline = random_subject()
            with own_rng(subject.seed, subject.device):
                random_scores = {f"random_{k}": v for k, v in protocol.run(baseline).items()}
        record = {"protocol": protocol.name, "tag": protocol.tag, "settings": protocol.settings(),
                  "eval_train_split": subject.datamodule.eval_split_names[0],
                  "eval_val_split": subject.datamodule.eval_split_names[1],
                  **scores, **random_scores, "wall_time_s": round(time.time() - start, 1)}
        if out is not None:
            path = out(protocol.tag)
            write_json_atomic(path, record)
            rank_zero_info(f"{protocol.tag}: {path}")
        results.update(scores)
        results.update(random_scores)
    return results



def percent(x: float) -> float:
    return round(float(x), 2)
