"""Labelled data for the protocols that train (SGD linear probe, fine-tuning): labels without decoding images,
balanced label-fraction subsets and their list files, shuffled batches, and crop + flip views on the device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from src.data.sampler import epoch_generator
from src.data.views import Views
from src.utils.errors import UserError
from src.utils.io import write_text_atomic


def split_labels(dataset: Dataset) -> torch.Tensor:
    """The labels (N,) of a labelled split, read without decoding images where the dataset allows (tensors in memory,
    folder trees, subsets of them); other datasets are read once."""
    if isinstance(dataset, Subset):
        return split_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    split = getattr(dataset, "split", None)
    if split is not None and hasattr(split, "labels"):
        return torch.as_tensor(split.labels, dtype=torch.long)
    samples = getattr(dataset, "samples", None)
    if samples is not None and samples and isinstance(samples[0], tuple):
        return torch.tensor([int(c) for _, c in samples], dtype=torch.long)
    loader = DataLoader(dataset, batch_size=256, num_workers=0)
    return torch.cat([torch.as_tensor(y).long() for _, y in loader])


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced ``fraction`` of a labelled split: each class keeps round(fraction x its
    size) of its samples (at least one), drawn by a permutation seeded with ``seed``; unlabelled samples (-1) are
    never drawn. The same (labels, fraction, seed) always gives the same subset."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"label_fraction={fraction} must be in (0, 1], e.g. 0.01 or 0.1")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in sorted(int(c) for c in labels.unique() if c >= 0):
        members = (labels == c).nonzero().flatten()
        keep = max(1, round(fraction * members.numel()))
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:keep]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def _names(dataset: Dataset) -> list[str] | None:
    """Per-sample file paths relative to the folder (folder datasets), or None (tensors in memory)."""
    if isinstance(dataset, Subset):
        names = _names(dataset.dataset)
        return None if names is None else [names[i] for i in dataset.indices]
    samples, root = getattr(dataset, "samples", None), getattr(dataset, "root", None)
    if not samples or root is None or not isinstance(samples[0], tuple):
        return None
    return [str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p for p, _ in samples]


def write_subset(path: Path, indices: torch.Tensor, dataset: Dataset, header: str) -> None:
    """A list file of the subset: one sample per line, the file's path under the folder for folder datasets (the
    format of SimCLR's published ImageNet lists, which :func:`read_subset` also reads), else its index."""
    names = _names(dataset)
    lines = [names[i] for i in indices.tolist()] if names is not None else [str(i) for i in indices.tolist()]
    write_text_atomic(path, f"# {header}\n" + "\n".join(lines) + "\n")


def read_subset(path: Path, dataset: Dataset) -> torch.Tensor:
    """Indices (sorted) of the samples a list file names: indices, file paths under the folder, or bare file names
    (e.g. ``n01440764_10026.JPEG`` in SimCLR's lists). Lines starting with ``#`` are comments."""
    if not path.is_file():
        raise UserError(f"subset_file={path}: no such file; give a list of file names or indices, one per line")
    entries = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not entries:
        raise UserError(f"subset_file={path} lists no samples")
    n = len(dataset)
    if all(e.isdigit() for e in entries):
        idx = sorted({int(e) for e in entries})
        if idx[-1] >= n:
            raise UserError(f"subset_file={path} names index {idx[-1]} but the split has {n} samples")
        return torch.tensor(idx, dtype=torch.long)
    names = _names(dataset)
    if names is None:
        raise UserError(f"subset_file={path} lists file names but this dataset is held in memory; list indices")
    where = {name: i for i, name in enumerate(names)}
    bare: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        bare.setdefault(Path(name).name, []).append(i)
    for e in entries:
        if e not in where and len(bare.get(e, [])) > 1:
            raise UserError(f"subset_file={path}: {e} names {len(bare[e])} files of the split; give paths under the "
                            f"folder (such as {names[bare[e][0]]})")
    where.update({name: found[0] for name, found in bare.items() if name not in where})
    missing = [e for e in entries if e not in where]
    if missing:
        raise UserError(f"subset_file={path}: {len(missing)} of {len(entries)} entries are not in the split "
                        f"(e.g. {missing[0]}); the list must name files of the labelled train split")
    return torch.tensor(sorted({where[e] for e in entries}), dtype=torch.long)


def shuffled_batches(dataset: Dataset, indices: torch.Tensor, batch_size: int, seed: int, epoch: int,
                     num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images uint8, labels)`` batches over ``indices`` of ``dataset`` in an order drawn from (seed, epoch) alone;
    the last batch may be smaller. Tensors held in memory are indexed directly (no loader)."""
    order = indices[torch.randperm(indices.numel(), generator=epoch_generator(seed, epoch))]
    split = getattr(dataset, "split", None)
    if split is not None and hasattr(split, "images"):
        for i in range(0, order.numel(), batch_size):
            part = order[i : i + batch_size]
            yield split.images[part], split.labels[part]
        return
    yield from DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=num_workers)


def crop_flip_views(views: Views, size: int, scale: tuple[float, float]) -> Views:
    """The supervised training augmentation: a random resized crop to ``size`` (area in ``scale``) and a horizontal
    flip, per sample, with the run's normalisation (no colour changes)."""
    crops = [{"size": int(size), "scale": list(scale), "flip_p": 0.5, "jitter_p": 0.0, "gray_p": 0.0}]
    return Views(crops, views.mean.tolist(), views.std.tolist(), views.eval_size)


def eval_size(views: Views, images: torch.Tensor) -> int:
    """The side of the evaluation view of ``images``: ``views.eval_size``, else the images' shorter side."""
    return int(views.eval_size or min(images.shape[-2:]))
