"""Evaluation protocols: the final evaluation's kNN + linear probe (:mod:`.frozen`), zero-shot and retrieval
(:mod:`.image_text`), kNN (a sweep of k), linear probes, fine-tuning with a label fraction, N-shot logistic
regression, embedding plots. Lightning-free; one implementation each, called by the end of a training run
(``eval.final``, ``eval.final.protocols=[...]``), by ``python -m src.eval CKPT [protocol=<name>]`` and (kNN) by the
per-epoch monitor, so the same checkpoint gives the same figures whichever command measured it.

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
    say: Callable[[str], None] = print  # where a protocol's notes go (the final evaluation: rank 0's log)
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
        """A copy of the feature extractor to train (fine-tuning): the model's ``feature_network`` where it has one
        (a method's backbone when its features are the backbone's, the usual case), else the whole model."""
        return copy.deepcopy(getattr(self.model, "feature_network", self.model)).to(self.device)

    def show(self, what: str, image: torch.Tensor, title: str) -> Path | None:
        """Save ``image`` (C x H x W in [0, 1]) to ``pictures(what)`` and hand it to ``publish``; the file, if any."""
        path = None
        if self.pictures is not None:
            from torchvision.utils import save_image

            path = self.pictures(what)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
        if self.publish is not None:
            self.publish(what, image, title)
        return path

    @property
    def num_classes(self) -> int:
        return int(self.datamodule.num_classes)


class Protocol(ABC):
    """Base of the protocols: ``name`` (the config option), ``tag`` (names its results file and prefixes its keys;
    e.g. ``finetune_1pct``), :meth:`run`, and :meth:`run_baseline` for the random-init model (the same by default).
    ``own_file``: whether its figures also go to ``<stem>.<tag>.json`` (the final evaluation's go to results.json)."""

    name = "protocol"
    own_file = True

    @property
    def tag(self) -> str:
        return self.name

    def applies_to(self, model: Any) -> bool:
        """Whether this protocol measures ``model`` (image–text protocols need a text tower)."""
        return True

    @abstractmethod
    def run(self, subject: Subject) -> dict[str, Any]:
        """The protocol's figures on ``subject`` (keys prefixed with :attr:`tag`)."""

    def run_baseline(self, subject: Subject) -> dict[str, Any]:
        """The figures of the random-init model (keys get the ``random_`` prefix)."""
        return self.run(subject)

    def settings(self) -> dict[str, Any]:
        """The protocol's settings as plain values (written into its results file)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def run_protocols(protocols: list[Protocol], subject: Subject, random_subject: Callable[[], Subject] | None,
                  out: Callable[[str], Path] | None) -> dict[str, Any]:
    """Every protocol that applies to ``subject.model`` on ``subject`` and on ``random_subject()`` (a random-init model
    of the same architecture, built once, on its own RNG stream seeded with the subject's seed); each run draws from
    its own stream seeded with the subject's seed, so both models see the same subsets, episodes and crops, and the
    global RNG is left as it was. Keys of the baseline are prefixed ``random_``. ``out(tag)`` is the results file of a
    protocol with ``own_file`` (None: no files). Returns every key."""
    results: dict[str, Any] = {}
    baseline = None
    for protocol in protocols:
        if not protocol.applies_to(subject.model):
            continue
        start = time.time()
        with own_rng(subject.seed, subject.device):  # the same draws (subsets, episodes, crops) for both models
            scores = protocol.run(subject)
        random_scores: dict[str, Any] = {}
        if random_subject is not None:
            if baseline is None:
                with own_rng(subject.seed, subject.device):  # the same weights whoever asks for the baseline
                    baseline = random_subject()
            with own_rng(subject.seed, subject.device):
                random_scores = {f"random_{k}": v for k, v in protocol.run_baseline(baseline).items()}
        if out is not None and protocol.own_file:
            record = {"protocol": protocol.name, "tag": protocol.tag, "settings": protocol.settings(),
                      "eval_train_split": subject.datamodule.eval_split_names[0],
                      "eval_val_split": subject.datamodule.eval_split_names[1],
                      **scores, **random_scores, "wall_time_s": round(time.time() - start, 1)}
            subject.say(f"{protocol.tag}: {write_json_atomic(out(protocol.tag), record)}")
        results.update(scores)
        results.update(random_scores)
    return results


def percent(x: float) -> float:
    return round(float(x), 2)
