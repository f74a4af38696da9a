"""``protocol=finetune``: the whole backbone and a linear head trained end to end on a labelled fraction.

The subset is a class-balanced ``label_fraction`` of the labelled train split drawn with the run's seed
(:func:`src.protocols.data.balanced_subset`), written beside the results as ``subset_<pct>_seed<seed>.txt`` and read
back from there on the next run, so every checkpoint (and the random-init baseline) is fine-tuned on the same
images; ``subset_file`` gives a list instead (indices, or file names such as SimCLR's ImageNet 1% / 10% lists).
Training: random resized crop + flip on the device, SGD with Nesterov momentum (or AdamW), the learning rate scaled
by batch / 256 with a warm-up and a cosine decay per step; every backbone parameter trained (also those frozen in
pre-training), no weight decay on biases, norms, tokens and position embeddings, and optionally BEiT / MAE's
layer-wise decay for ViTs (``layer_decay``: block i of L gets ``layer_decay^(L + 1 - i)`` of the rate, the patch
embedding ``layer_decay^(L + 1)``): :func:`src.nn.optim.finetune_param_groups`. Measured on the evaluation view of
the evaluation split.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.nn.metrics import accuracy
from src.nn.optim import finetune_param_groups as param_groups
from src.nn.optim import layer_ids  # noqa: F401 (part of this module's interface)
from src.nn.schedules import warmup_cosine
from src.protocols import Protocol, Subject, percent
from src.protocols.data import (
    balanced_subset,
    crop_flip_views,
    eval_size,
    read_subset,
    shuffled_batches,
    split_labels,
    write_subset,
)
from src.protocols.features import extract_features

OPTIMIZERS = ("sgd", "adamw")


class FineTune(Protocol):
    name = "finetune"

    def __init__(self, label_fraction: float = 1.0, subset_file: str | None = None, epochs: int = 30,
                 batch_size: int = 256, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 5e-4,
                 layer_decay: float | None = None, warmup_epochs: float = 0.0,
                 crop_scale: tuple[float, float] = (0.08, 1.0), max_val_items: int | None = None):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"protocols.finetune.optimizer={optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"protocols.finetune.label_fraction={label_fraction} must be in (0, 1], e.g. 0.01 or 0.1")
        if epochs < 1 or batch_size < 2 or lr <= 0:
            raise ValueError(f"protocols.finetune: epochs={epochs} (>= 1), batch_size={batch_size} (>= 2) and "
                             f"lr={lr} (> 0) are out of range")
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"protocols.finetune.layer_decay={layer_decay} must be in (0, 1] or null")
        self.label_fraction, self.subset_file = float(label_fraction), subset_file
        self.epochs, self.batch_size, self.optimizer, self.lr = int(epochs), int(batch_size), optimizer, float(lr)
        self.weight_decay, self.layer_decay, self.warmup_epochs = float(weight_decay), layer_decay, float(warmup_epochs)
        self.crop_scale, self.max_val_items = tuple(float(s) for s in crop_scale), max_val_items

    @property
    def tag(self) -> str:
        if self.subset_file:
            return f"finetune_{Path(self.subset_file).stem}"
        pct = self.label_fraction * 100
        return f"finetune_{pct:g}pct".replace(".", "p")

    def subset(self, subject: Subject) -> torch.Tensor:
        """The labelled images to train on: the list file, the saved subset of this fraction and seed, or a new one
        (then saved beside the results)."""
        dataset = subject.datamodule.eval_train
        if self.subset_file:
            return read_subset(Path(self.subset_file), dataset)
        labels = split_labels(dataset)
        if self.label_fraction >= 1.0:
            return (labels >= 0).nonzero().flatten()
        saved = subject.files(f"subset_{self.tag.removeprefix('finetune_')}_seed{subject.seed}.txt")
        if saved is not None and saved.is_file():
            return read_subset(saved, dataset)
        idx = balanced_subset(labels, self.label_fraction, subject.seed)
        if saved is not None:
            write_subset(saved, idx, dataset, f"{idx.numel()} images: a class-balanced {self.label_fraction:g} of the "
                         f"{subject.datamodule.eval_split_names[0]} split, seed {subject.seed}")
        return idx

    def run(self, subject: Subject) -> dict:
        indices = self.subset(subject)
        dataset, device = subject.datamodule.eval_train, subject.device
        model = subject.trainable_copy().train()
        head = nn.Linear(subject.feature_dim, subject.num_classes).to(device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        batch = min(self.batch_size, indices.numel())
        lr = self.lr * batch / 256
        groups = param_groups(model, head, self.weight_decay, self.layer_decay)
        opt = (torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True) if self.optimizer == "sgd"
               else torch.optim.AdamW(groups, lr=lr))
        per_epoch = math.ceil(indices.numel() / batch)
        steps, warmup, step = self.epochs * per_epoch, int(self.warmup_epochs * per_epoch), 0
        augment = crop_flip_views(subject.views, eval_size(subject.views, torch.as_tensor(dataset[0][0])[None]),
                                  self.crop_scale).to(device)
        ctx = subject.forward_context or contextlib.nullcontext
        with torch.enable_grad():
            for epoch in range(self.epochs):
                for images, y in shuffled_batches(dataset, indices, batch, subject.seed, epoch,
                                                  subject.datamodule.num_workers):
                    if len(y) < 2:  # BatchNorm cannot train on a batch of one
                        continue
                    for group in opt.param_groups:
                        group["lr"] = lr * group["lr_scale"] * warmup_cosine(step, steps, warmup)
                    with ctx():
                        logits = head(model(augment(images.to(device))[0]).flatten(1))
                    loss = F.cross_entropy(logits.float(), torch.as_tensor(y).long().to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
        classifier = nn.Sequential(model, nn.Flatten(1), head)
        logits, vy = extract_features(classifier, subject.views, subject.datamodule.eval_val_dataloader(), device,
                                           self.max_val_items, subject.forward_context)
        k = subject.num_classes
        return {f"{self.tag}_top1": percent(accuracy(logits, vy, k, 1)),
                f"{self.tag}_top5": percent(accuracy(logits, vy, k, 5)),
                f"{self.tag}_train_images": int(indices.numel())}
