"""Training throughput, data-loading wait and peak memory.

Place this callback FIRST in the callback list: callbacks' ``on_train_batch_end`` hooks run in list order, so
the step time measured here excludes the work of later callbacks such as the online probe. To keep that work out of
the data wait as well, ``setup`` appends a marker callback at the END of ``trainer.callbacks``.

A step starts when its batch arrives on the device (``SSLMethod.on_after_batch_transfer`` notes the time before it
makes the views, so making views counts as training, not as waiting) and ends at this callback's
``on_train_batch_end``; the data wait is the time from the marker's ``on_train_batch_end`` to the next batch's
arrival within an epoch (it still includes the method's own ``on_train_batch_end``, e.g. an EMA update, and
Lightning's logging).

No clock reading waits for the GPU at every step: on CUDA the steps are timed in windows that close on the logging
steps (every ``trainer.log_every_n_steps``, where the non-finite guard also reads its flag) and at the epoch's last
batch, with one ``torch.cuda.synchronize`` then; a window's step time is its wall time less its data waits. On the
CPU every step is its own window.

Logs ``perf/images_per_s`` when a window closes (in the progress bar on the CPU: images in the global batch,
``batch["image"].shape[0] * world_size``, over the window's step time). ``self.results`` holds
``train_images_per_s`` (all images / summed step time), ``data_wait_fraction`` (wait / (wait + step time)),
``peak_memory_mib`` and ``peak_memory_kind`` (``"cuda_allocated"``: ``torch.cuda.max_memory_allocated``;
``"cpu_peak_rss"``: process peak RSS) and ``train_time_s`` (wall time from ``on_train_start`` to
``on_train_end``).
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (CUDA is synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory(device: torch.device) -> tuple[float, str]:
    """``(MiB, kind)``: CUDA's peak allocated memory on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_peak_rss"


class _AfterCallbacks(L.Callback):
    """Runs after every other callback's ``on_train_batch_end``: marks the start of the data wait."""

    def __init__(self, monitor: ThroughputMonitor):
        self.monitor = monitor

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.monitor._t_last_end = time.perf_counter()  # host time: no wait for the device


class ThroughputMonitor(L.Callback):
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self._images = 0
        self._step_s = self._wait_s = 0.0
        self._t_fit = self._t_last_end = None
        self._window: dict[str, float] | None = None  # the open timing window: start, images, wait, steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not any(isinstance(c, _AfterCallbacks) and c.monitor is self for c in trainer.callbacks):
            trainer.callbacks.append(_AfterCallbacks(self))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_fit = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last_end = None  # the gap across an epoch boundary is not data wait
        self._window = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        arrived = getattr(pl_module, "batch_arrived", None)
        start = arrived if arrived is not None and arrived <= now else now
        wait = start - self._t_last_end if self._t_last_end is not None else 0.0
        self._wait_s += wait
        if self._window is None:  # the device is idle here: the previous window ended with a synchronisation
            self._window = {"start": start, "images": 0, "wait": 0.0, "steps": 0}
        else:
            self._window["wait"] += wait

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        window = self._window
        window["images"] += batch["image"].shape[0] * trainer.world_size
        window["steps"] += 1
        closes = (pl_module.device.type != "cuda" or trainer._logger_connector.should_update_logs  # a logging step
                  or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if not closes:
            return
        step = max(synced_clock(pl_module.device) - window["start"] - window["wait"], 1e-9)
        self._images += window["images"]
        self._step_s += step
        self._window = None
        # progress-bar values are read back from the device after every batch: shown on the CPU only (as the loss)
        pl_module.log("perf/images_per_s", window["images"] / step, on_step=True, on_epoch=False,
                      prog_bar=pl_module.device.type == "cpu")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak, kind = peak_memory(pl_module.device)
        busy = self._step_s + self._wait_s
        self.results = {
            "train_images_per_s": round(self._images / self._step_s, 2) if self._step_s > 0 else 0.0,
            "data_wait_fraction": round(self._wait_s / busy, 4) if busy > 0 else 0.0,
            "peak_memory_mib": round(peak, 1),
            "peak_memory_kind": kind,
            "train_time_s": round(time.perf_counter() - self._t_fit, 2) if self._t_fit is not None else 0.0,
        }
