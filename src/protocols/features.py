"""Frozen-feature extraction: the one way every evaluation (final evaluation, kNN monitor, online probe, protocols,
``src.eval``, ``src.embed``) reads a model's features. Lightning-free.

Features are computed in eval mode under ``torch.no_grad()``; the train/eval flag of every submodule is
restored exactly afterwards, so BatchNorm running statistics and the training state of the method are left
untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Put ``module`` (if it is an ``nn.Module``) in eval mode, then restore each submodule's own flag."""
    if not isinstance(module, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def evaluated_backbone(model: Any) -> Any:
    """The backbone whose features are measured: a method's ``evaluated_backbone`` (DINO's family: the teacher's),
    else its ``backbone``, else ``model`` itself (a bare backbone)."""
    for name in ("evaluated_backbone", "backbone"):
        if (backbone := getattr(model, name, None)) is not None:
            return backbone
    return model


def evenly_subsampled(loader: Iterable, max_items: int | None) -> Iterable:
    """A loader over ``max_items`` evenly spaced samples of ``loader``'s dataset (same batch size and workers).

    Eval loaders are not shuffled and folder datasets are sorted by class, so keeping the first ``max_items``
    would drop whole classes. Loaders that are not plain map-style ``DataLoader``s are returned unchanged
    (and get truncated instead).
    """
    dataset = getattr(loader, "dataset", None)
    if max_items is None or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader
    if isinstance(dataset, IterableDataset):
        return loader
    try:
        n = len(dataset)
    except TypeError:
        return loader
    if n <= max_items:
        return loader
    idx = torch.linspace(0, n - 1, max_items).round().long().tolist()
    extra = (
        {"persistent_workers": False, "prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}
    )
    return DataLoader(
        Subset(dataset, idx),
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        **extra,
    )


def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor],
    views: Any,
    loader: Iterable,
    device: torch.device | str,
    max_items: int | None = None,
    forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(views.eval_view(images))`` over ``loader`` of ``(images uint8, labels)`` batches.

    ``forward_context`` is an optional zero-argument callable returning a context manager entered around each
    forward pass, e.g. ``trainer.precision_plugin.forward_context`` for bf16 autocast. Returns
    ``(features float32 (N, D) on CPU, labels long (N,) on CPU)``; with ``max_items``, at most that many
    samples, evenly spaced over the dataset (see :func:`evenly_subsampled`).
    """
    feats, labels, count = [], [], 0
    with eval_mode(model), eval_mode(views), torch.no_grad():
        for images, targets in evenly_subsampled(loader, max_items):
            if max_items is not None and count >= max_items:
                break
            x = views.eval_view(images.to(device, non_blocking=True))
            with forward_context() if forward_context is not None else contextlib.nullcontext():
                f = model(x)
            feats.append(f.flatten(1).float().cpu())
            labels.append(torch.as_tensor(targets).long().cpu())
            count += feats[-1].shape[0]
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    out_f, out_y = torch.cat(feats), torch.cat(labels)
    if max_items is not None:
        out_f, out_y = out_f[:max_items], out_y[:max_items]
    return out_f, out_y



@contextlib.contextmanager
def own_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on its own random streams (CPU and ``device``'s) seeded with ``seed``; the global streams
    are left as they were, so a random-init baseline (its weights, its loaders' seeds) never shifts training's
    draws."""
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else 0)
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield



def autocast_context(precision: str, device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager]:
    """The forward context of a run's ``trainer.precision`` (``bf16-mixed``, ``16-mixed``: autocast to that type on
    ``device``; anything else: none), so evaluation outside a trainer computes what the run's evaluation computed."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)
