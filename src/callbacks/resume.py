"""What makes a resumed run continue exactly: ``last.ckpt`` after every N epochs, the data position in
every checkpoint, and a clean stop on signals. (The randomness of each batch needs no saved state: it is
seeded from the run seed, rank, epoch and batch index, see ``src.data.sampler.batch_seed``.)

:class:`LastCheckpoint` writes ``<run>/checkpoints/last.ckpt`` at the end of every ``every_n_epochs``-th
epoch and of the last one (through the trainer's checkpoint IO, which writes atomically), after every
other callback has updated its state for the epoch.
:class:`Preemption` turns SIGTERM (a cluster's pre-emption),
SIGINT (Ctrl-C) and SIGUSR1/SIGUSR2 (SLURM's ``--signal`` warning) into a checkpoint at the end of the
current batch, then stops the run with :class:`RunInterrupted`. For SIGUSR1/SIGUSR2, a handler that a cluster
tool installed before training (submitit's checkpoint-and-requeue, under ``hydra/launcher=slurm``) is called
after the checkpoint is written: the tool requeues the job (submitit: global rank 0 runs ``scontrol requeue``)
and the requeued job continues from ``last.ckpt`` with ``resume=auto``. Lightning's own SLURM requeue is off
(src/train.py), so exactly one process requeues.
:class:`TrainingStarted` and :func:`finish_evaluations`: a run resumed from a checkpoint written after its last
epoch (killed during its final evaluation) still gets its final evaluation.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info

from src.utils.errors import RunInterrupted

# While training, these only set a flag (Lightning's own SIGTERM handler runs collectives inside the handler,
# which deadlocks DDP when the ranks get different numbers of signals); the flag is reduced over the ranks at
# batch ends (see Preemption) and at the end of every epoch.
CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # SLURM's --signal warning before a time limit or pre-emption


def _foreign_handler(handler: Any) -> bool:
    """A Python handler installed before training by something other than Lightning (whose own handlers run
    collectives or requeue by themselves) and other than Python's defaults."""
    return callable(handler) and handler is not signal.default_int_handler and \
        not str(getattr(handler, "__module__", "") or type(handler).__module__).startswith("lightning")


class LastCheckpoint(Checkpoint):
    """Lightning runs ``Checkpoint`` callbacks after all others, so the saved state is the epoch's final one."""

    def __init__(self, path: str | Path, every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"checkpoint.every_n_epochs={every_n_epochs} must be >= 1")
        self.path, self.every_n_epochs = str(path), every_n_epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # Every rank computes the epoch's sync_dist metrics here, as ModelCheckpoint does: rank 0's progress bar
        # has already synced them, and a rank that had not would pair those reduces with the save's barrier (hang).
        _ = trainer.callback_metrics
        if epoch % self.every_n_epochs == 0 or epoch >= trainer.max_epochs or trainer.should_stop:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state, to resume


class DataPosition(L.Callback):
    """Checkpoints hold the epoch and how many batches of it the loop has processed; a mid-epoch resume makes
    the training loader's :class:`~src.data.sampler.EpochSampler` skip those samples. (Lightning's own
    stateful-loader restore does not reach a loader that was set up early for ``estimated_stepping_batches``.)"""

    def __init__(self):
        self._trainer: L.Trainer | None = None
        self._pending: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, int]:
        t = self._trainer
        if t is None:
            return {}
        return {"epoch": t.current_epoch, "batches": t.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._pending = state_dict or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if self._pending is not None and hasattr(getattr(loader, "sampler", None), "skip_once"):
            loader.sampler.skip_once(self._pending["epoch"], self._pending["batches"] * loader.batch_size)
        self._pending = None


class Preemption(L.Callback):
    """On a caught signal, every rank finishes its batch, ``last.ckpt`` is written (atomically) and the run
    stops with :class:`RunInterrupted`; ``resume=auto`` continues it from that batch.

    The ranks agree on stopping through a reduce of the flag. Where that costs no host-device sync (one process,
    or processes on CPUs) the flag is read after every batch, so the run stops at the batch the signal came in;
    on accelerators with several processes it is reduced every ``check_every_n_batches`` batches, at the last
    batch and at the end of each epoch, so the run stops at most that many batches later."""

    def __init__(self, checkpoint_path: str | Path, check_every_n_batches: int = 10):
        if check_every_n_batches < 1:
            raise ValueError(f"check_every_n_batches={check_every_n_batches} must be >= 1")
        self.checkpoint_path = str(checkpoint_path)
        self.check_every_n_batches = check_every_n_batches
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        if getattr(trainer, "received_sigterm", False):  # during set-up, before our handler was in place
            self.received = signal.SIGTERM
        for sig in CAUGHT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _every_batch(self, trainer: L.Trainer) -> bool:
        return trainer.world_size == 1 or trainer.strategy.root_device.type == "cpu"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        due = (batch_idx + 1) % self.check_every_n_batches == 0 or batch_idx + 1 >= trainer.num_training_batches
        if due or self._every_batch(trainer):
            self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)  # a signal during the epoch's evaluation callbacks

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        """Checkpoint and raise :class:`RunInterrupted` when any rank caught a signal (all ranks call this together)."""
        received = self.received or (signal.SIGTERM if getattr(trainer, "received_sigterm", False) else None)
        if trainer.world_size == 1:  # no reduce: the flag is a Python value
            if received is None:
                return
        elif not trainer.strategy.reduce_boolean_decision(received is not None, all=False):
            return
        trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
        previous = self._previous.get(received)
        self._restore_handlers()
        name = signal.Signals(received).name if received else "a signal on another rank"
        if received in REQUEUE_SIGNALS and _foreign_handler(previous):
            # a cluster tool's own handler for its warning signal (submitit's checkpoint-and-requeue under
            # hydra/launcher=slurm) runs now that last.ckpt is written: it requeues the job and exits
            rank_zero_info(f"{name}: checkpoint saved to {self.checkpoint_path}; handing over to "
                           f"{getattr(previous, '__qualname__', previous)} (requeue)")
            previous(received, None)
        raise RunInterrupted(received or signal.SIGTERM,
                             f"stopped by {name} after step {trainer.global_step} (epoch {trainer.current_epoch}); "
                             f"checkpoint saved to {self.checkpoint_path}; run the same command with resume=auto "
                             "to continue")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


class TrainingStarted(L.Callback):
    """Whether the fit loop ran. Resumed from a ``last.ckpt`` written after the last epoch (a run killed during its
    final evaluation), Lightning skips the loop and with it every ``on_train_end``; :func:`train` then runs the final
    evaluations itself (:func:`finish_evaluations`)."""

    def __init__(self):
        self.started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True


def finish_evaluations(trainer: L.Trainer, method: L.LightningModule, callbacks: list[L.Callback]) -> None:
    """The end-of-training evaluations (callbacks marked ``final``) of a run whose training had already ended in the
    checkpoint it resumed from, on the run's device, with the same results an uninterrupted run writes."""
    rank_zero_info("training had already ended in the checkpoint (stopped during its final evaluation); "
                   "running the final evaluation now")
    method.to(trainer.strategy.root_device)
    for cb in callbacks:
        if getattr(cb, "final", False):
            cb.on_train_end(trainer, method)
