"""Training throughput, data-loading wait and peak memory.

Place this callback FIRST in the callback list: callbacks' ``on_train_batch_end`` hooks run in list order, so
the step time measured here (``on_train_batch_start`` -> this ``on_train_batch_end``) excludes the work of
later callbacks such as the online probe. To keep that work out of the data wait as well, ``setup`` appends a
marker callback at the END of ``trainer.callbacks``; the wait is the time from the marker's
``on_train_batch_end`` to the next ``on_train_batch_start`` within an epoch (it still includes the method's own
``on_train_batch_end``, e.g. an EMA update, and Lightning's logging).

Logs ``perf/images_per_s`` every step (``prog_bar=True``: images in the global batch,
``batch["image"].shape[0] * world_size``, over that step's time). ``self.results`` holds
``train_images_per_s`` (all images / summed step time), ``data_wait_fraction`` (wait / (wait + step time)),
``peak_memory_mib`` and ``peak_memory_kind`` (``"cuda_allocated"``: ``torch.cuda.max_memory_allocated``;
``"cpu_peak_rss"``: process peak RSS) and ``train_time_s`` (wall time from ``on_train_start`` to
``on_train_end``). CUDA is synchronised before each clock reading.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch


class _AfterCallbacks(L.Callback):
    """Runs after every other callback's ``on_train_batch_end``: marks the start of the data wait."""

    def __init__(self, monitor: ThroughputMonitor):
        self.monitor = monitor

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.monitor._t_last_end = self.monitor._now(pl_module)


class ThroughputMonitor(L.Callback):
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self._images = 0
        self._step_s = self._wait_s = 0.0
        self._t_fit = self._t_start = self._t_last_end = None

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not any(isinstance(c, _AfterCallbacks) and c.monitor is self for c in trainer.callbacks):
            trainer.callbacks.append(_AfterCallbacks(self))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_fit = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last_end = None  # the gap across an epoch boundary is not data wait

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._t_start = self._now(pl_module)
        if self._t_last_end is not None:
            self._wait_s += self._t_start - self._t_last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        end = self._now(pl_module)
        images = batch["image"].shape[0] * trainer.world_size
        step = max(end - self._t_start, 1e-9)
        self._images += images
        self._step_s += step
        pl_module.log("perf/images_per_s", images / step, on_step=True, on_epoch=False, prog_bar=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(pl_module.device) / 2**20, "cuda_allocated"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            peak, kind = rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"
        busy = self._step_s + self._wait_s
        self.results = {
            "train_images_per_s": round(self._images / self._step_s, 2) if self._step_s > 0 else 0.0,
            "data_wait_fraction": round(self._wait_s / busy, 4) if busy > 0 else 0.0,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": kind,
            "train_time_s": round(time.perf_counter() - self._t_fit, 2) if self._t_fit is not None else 0.0,
        }
