"""DataHealth: how many images of a folder dataset could not be decoded, and which.

The folder datasets skip a file that fails to decode (unreadable, truncated, not an image) and record it,
in whichever DataLoader worker met it (:class:`src.data.datasets.FolderImages`). At the end of every
training epoch, and once more after the final evaluation, this callback collects those records (from every
rank under DDP), and on rank 0, when the list grew, writes it to ``<run dir>/skipped_images.txt``
(``path<TAB>reason`` per line) and logs one warning line with the count. ``results`` gains
``skipped_images`` (the count) when there were any. ``src/train.py`` adds it after the evaluation
callbacks; with in-memory datasets it has nothing to report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch.distributed as dist

from src.utils.io import write_text_atomic

log = logging.getLogger(__name__)


def _all_ranks(skipped: dict[str, str]) -> dict[str, str]:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return skipped
    parts: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, skipped)
    merged: dict[str, str] = {}
    for part in parts:
        merged.update(part or {})
    return dict(sorted(merged.items()))


class DataHealth(L.Callback):
    def __init__(self, filename: str = "skipped_images.txt"):
        self.filename = filename
        self.reported = 0  # how many skipped files the last warning named
        self.results: dict[str, int] = {}

    def _report(self, trainer: L.Trainer, when: str) -> None:
        collect = getattr(trainer.datamodule, "skipped_images", None)
        if collect is None:
            return
        skipped = _all_ranks(collect())
        if not trainer.is_global_zero or len(skipped) <= self.reported:
            return
        path = Path(trainer.default_root_dir) / self.filename
        write_text_atomic(path, "".join(f"{p}\t{reason}\n" for p, reason in skipped.items()))
        new = len(skipped) - self.reported
        log.warning(f"data: skipped {len(skipped)} image file(s) that could not be decoded ({new} new {when}); "
                    f"list in {path}")
        self.reported = len(skipped)
        self.results = {"skipped_images": len(skipped)}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, f"in epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, "during evaluation")
