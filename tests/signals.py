"""Test-only callback: the run signals itself at a chosen optimizer step, named in the environment so that
the interrupted run and its continuation have the same config (``+eval.signal._target_=tests.signals.SignalAtStep``)."""

import json
import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    """Sends ``SIG$SIGNAL_NAME`` (default KILL) to this process after optimizer step ``$SIGNAL_AT_STEP``, or with
    ``SIGNAL_AT_STEP=end`` at the end of training: after the final evaluation (it comes before this callback),
    before results.json is written. What is on disk then is what a kill anywhere in the final evaluation leaves."""

    def _signal(self):
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("SIGNAL_NAME", "KILL")))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = os.environ.get("SIGNAL_AT_STEP")
        if step and step != "end" and trainer.global_step == int(step):
            self._signal()

    def on_train_end(self, trainer, pl_module):
        if os.environ.get("SIGNAL_AT_STEP") == "end":
            self._signal()


class NaNAtStep(L.Callback):
    """Fills the views of the batch after optimizer step ``$NAN_AT_STEP`` with NaN (a loss that is not finite)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = os.environ.get("NAN_AT_STEP")
        if step and trainer.global_step == int(step):
            for view in batch["views"]:
                view.fill_(float("nan"))


class MemoryTrace(L.Callback):
    """Writes the process's resident memory (MiB) after every optimizer step to ``$MEMORY_TRACE`` (JSON)."""

    def __init__(self):
        self.rss: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open("/proc/self/statm") as f:
            self.rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20)

    def on_train_end(self, trainer, pl_module):
        if os.environ.get("MEMORY_TRACE"):
            with open(os.environ["MEMORY_TRACE"], "w") as f:
                json.dump(self.rss, f)
