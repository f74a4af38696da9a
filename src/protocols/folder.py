"""Embeddings of every image under a folder, cached: what ``python -m src.embed`` and ``python -m src.search`` read.
Lightning-free.

Files are listed recursively in sorted path order (:func:`src.data.datasets.image_files`) and identified by path,
size and modification time. A cache (a ``torch.save`` file written atomically) keeps each file's embedding under a
``key`` that names the model and the preprocessing: a later call with the same key embeds only the files that are
new or changed, drops the removed ones, and does not retry unreadable files until they change; another key starts
over. Images are decoded by a ``decode(path) -> uint8 (C, H, W)`` function in loader workers (a file that cannot be
decoded is recorded with its reason, never fatal) and embedded by :func:`src.protocols.features.extract_features`,
the one feature extraction of the framework (eval mode, no gradients, ``views.eval_view``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from src.data.datasets import SkipLog, _reason, image_files
from src.protocols.features import extract_features

CACHE_VERSION = 2


@dataclass
class FolderEmbeddings:
    paths: list[str]  # the readable images, sorted
    features: Tensor  # (N, D) float32, row i for paths[i]
    skipped: dict[str, str]  # unreadable files: path -> reason
    embedded: int  # how many of ``paths`` were computed now (the rest came from the cache)


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of each image file under ``folder``, sorted by path."""
    out = []
    for path in image_files(folder):
        st = Path(path).stat()
        out.append((path, st.st_size, st.st_mtime_ns))
    return out


class _Files(SkipLog, Dataset):
    """``(image, i)`` for readable file i; a file that cannot be decoded gives a blank image and ``-1 - i`` and is
    recorded (with its reason) in the skip log, which loader workers share."""

    def __init__(self, paths: list[str], decode: Callable[[str], Tensor], shape: tuple[int, int, int]):
        self.paths, self.decode, self.shape = paths, decode, shape
        super().__init__()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = self.decode(self.paths[i])
            if tuple(image.shape) != self.shape:
                raise ValueError(f"decoded to {tuple(image.shape)}, not {self.shape}")
            return image, i
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; never kill a worker
            self._record(self.paths[i], _reason(e, self.paths[i]))
            return torch.zeros(self.shape, dtype=torch.uint8), -1 - i


def _counted(loader: Iterable, bar) -> Iterator:
    for images, index in loader:
        yield images, index
        bar.update(len(index))  # after the batch was embedded


def _read_cache(cache: Path | None, key: str) -> tuple[dict[tuple, Tensor], dict[tuple, str]]:
    if cache is None or not cache.is_file():
        return {}, {}
    try:
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("version") != CACHE_VERSION or saved.get("key") != key:
            return {}, {}  # another model or preprocessing: start over
        known = {tuple(k): e for k, e in zip(saved["files"], saved["embeddings"], strict=True)}
        bad = {tuple(k[:3]): str(k[3]) for k in saved["bad"]}
        return known, bad
    except Exception:  # noqa: BLE001 - a cache from another version or a broken write: rebuild it
        return {}, {}


def embed_folder(model: Callable[[Tensor], Tensor], views, decode: Callable[[str], Tensor],
                 shape: tuple[int, int, int], folder: Path, cache: Path | None, key: str, batch_size: int = 64,
                 device: torch.device | str = "cpu", workers: int = 0, progress: bool = False,
                 forward_context=None) -> FolderEmbeddings:
    """The embeddings ``model(views.eval_view(images))`` of every image under ``folder`` (decoded by ``decode`` to
    uint8 ``shape``), reusing ``cache`` (written back when anything changed) where its ``key`` matches."""
    from tqdm import tqdm

    from src.utils.errors import UserError

    files = listing(folder)
    if not files:
        raise UserError(f"--images {folder}: no images in it (looked for jpg/png/webp/... files, recursively)")
    known, bad = _read_cache(cache, key)
    embedded = 0
    current = set(files)
    bad = {f: r for f, r in bad.items() if f in current}
    todo = [f for f in files if f not in known and f not in bad]
    if todo:
        print(f"embedding {len(todo)} image(s) of {folder} ({len(files) - len(todo)} from the cache)", file=sys.stderr)
        dataset = _Files([f[0] for f in todo], decode, shape)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=min(workers, len(todo)), shuffle=False)
        with tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, leave=False) as bar:
            feats, index = extract_features(model, views, _counted(loader, bar), device, forward_context=forward_context)
        readable = index >= 0
        embedded = int(readable.sum())
        known.update(zip([todo[i] for i in index[readable].tolist()], feats[readable], strict=True))
        reasons = dataset.skipped
        for i in (-1 - index[~readable]).tolist():
            bad[todo[i]] = reasons.get(todo[i][0], "unreadable")
    kept = [f for f in files if f not in bad]
    features = torch.stack([known[f] for f in kept]) if kept else torch.zeros(0, 0)
    if todo and cache is not None:  # the atomic writer's module imports Lightning, so only here
        from src.utils.checkpointing import atomic_torch_save

        atomic_torch_save({"version": CACHE_VERSION, "key": key, "files": [list(f) for f in kept],
                           "embeddings": features, "bad": [[*f, r] for f, r in bad.items()]}, cache)
    return FolderEmbeddings([f[0] for f in kept], features, {f[0]: r for f, r in sorted(bad.items())}, embedded)
