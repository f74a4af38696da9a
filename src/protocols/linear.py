"""``protocol=linear``: linear classifiers on the frozen representation.

- cached (the final evaluation's probe, :func:`src.nn.linear_probe.train_linear_probe`): logistic regression by
  L-BFGS on standardised features of at most ``max_train_items`` train images (``linear_top1/5``);
- SGD with augmentation (``sgd_epochs > 0``; the MoCo / SimCLR linear protocol, for data too large to cache):
  every step computes the frozen features of a random resized crop + flip of each image, and a linear layer behind
  a parameter-free BatchNorm (MAE's linear probe) is trained by SGD with momentum and a cosine schedule
  (``sgd_linear_top1/5``, measured on the evaluation view of the evaluation split).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from src.nn.linear_probe import train_linear_probe
from src.nn.metrics import accuracy
from src.nn.schedules import warmup_cosine
from src.protocols import Protocol, Subject, percent
from src.protocols.data import crop_flip_views, eval_size, shuffled_batches, split_labels
from src.protocols.features import eval_mode


class Linear(Protocol):
    name = "linear"

    def __init__(self, cached: bool = True, epochs: int = 100, weight_decay: float = 1e-3,
                 max_train_items: int | None = 10000, max_val_items: int | None = None, sgd_epochs: int = 0,
                 sgd_lr: float = 0.1, sgd_batch_size: int = 256, sgd_weight_decay: float = 0.0,
                 crop_scale: tuple[float, float] = (0.08, 1.0), sgd_max_train_items: int | None = None):
        if not cached and sgd_epochs <= 0:
            raise ValueError("protocols.linear: cached=false and sgd_epochs=0 leave nothing to run; set one")
        if sgd_epochs < 0 or sgd_batch_size < 1 or sgd_lr <= 0:
            raise ValueError(f"protocols.linear: sgd_epochs={sgd_epochs} (>= 0), sgd_batch_size={sgd_batch_size} "
                             f"(>= 1) and sgd_lr={sgd_lr} (> 0) are out of range")
        self.cached, self.epochs, self.weight_decay = cached, int(epochs), float(weight_decay)
        self.max_train_items, self.max_val_items = max_train_items, max_val_items
        self.sgd_epochs, self.sgd_lr, self.sgd_batch_size = int(sgd_epochs), float(sgd_lr), int(sgd_batch_size)
        self.sgd_weight_decay, self.crop_scale = float(sgd_weight_decay), tuple(float(s) for s in crop_scale)
        self.sgd_max_train_items = sgd_max_train_items

    def run(self, subject: Subject) -> dict:
        out = {}
        vx, vy = subject.features("val", self.max_val_items)
        if self.cached:
            tx, ty = subject.features("train", self.max_train_items)
            d = subject.device
            scores = train_linear_probe(tx.to(d), ty.to(d), vx.to(d), vy.to(d), subject.num_classes, self.epochs,
                                        weight_decay=self.weight_decay)
            out.update(linear_top1=percent(scores["top1"]), linear_top5=percent(scores["top5"]))
        if self.sgd_epochs:
            probe = self.sgd_probe(subject, vx.shape[1])
            with torch.no_grad():
                logits = probe(vx.to(subject.device))
            out.update(sgd_linear_top1=percent(accuracy(logits, vy, subject.num_classes, 1)),
                       sgd_linear_top5=percent(accuracy(logits, vy, subject.num_classes, 5)))
        return out

    def sgd_probe(self, subject: Subject, dim: int) -> nn.Module:
        """BatchNorm (no affine) + linear layer trained on frozen features of augmented train images; eval mode."""
        dataset = subject.datamodule.eval_train
        labels = split_labels(dataset)
        indices = (labels >= 0).nonzero().flatten()
        if self.sgd_max_train_items is not None and indices.numel() > self.sgd_max_train_items:
            indices = indices[torch.linspace(0, indices.numel() - 1, self.sgd_max_train_items).round().long()]
        device, model = subject.device, subject.model
        first = dataset[0][0]
        augment = crop_flip_views(subject.views, eval_size(subject.views, torch.as_tensor(first)[None]),
                                  self.crop_scale).to(device)
        # momentum=None: the running statistics are the plain average over every batch (exact for frozen features)
        probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False, momentum=None),
                              nn.Linear(dim, subject.num_classes)).to(device)
        nn.init.zeros_(probe[1].weight)
        nn.init.zeros_(probe[1].bias)
        batch = min(self.sgd_batch_size, indices.numel())
        lr = self.sgd_lr * batch / 256
        opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=self.sgd_weight_decay)
        steps, step = self.sgd_epochs * math.ceil(indices.numel() / batch), 0
        ctx = subject.forward_context or contextlib.nullcontext
        with eval_mode(model), torch.enable_grad():
            for epoch in range(self.sgd_epochs):
                for images, y in shuffled_batches(dataset, indices, batch, subject.seed, epoch,
                                                  subject.datamodule.num_workers):
                    with torch.no_grad(), ctx():
                        feats = model(augment(images.to(device))[0]).flatten(1).float()
                    for group in opt.param_groups:
                        group["lr"] = lr * warmup_cosine(step, steps, 0, 0.0)
                    loss = F.cross_entropy(probe(feats), torch.as_tensor(y).long().to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
        return probe.eval()
