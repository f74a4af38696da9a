"""The GPU fast path, checked on the CPU: no host-device sync in a training step between the checks of the non-finite
guard (every ``trainer.log_every_n_steps`` steps, the last batch of each epoch, before a checkpoint) and of the
pre-emption flag (every ``check_every_n_batches`` batches with several processes on accelerators)."""

import signal
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from src.callbacks.resume import DataPosition, LastCheckpoint, Preemption
from src.methods.base import NonFiniteLossError
from src.nn.nonfinite import NonFiniteWatch
from src.utils.errors import RunInterrupted
from tests.helpers import tiny_cfg
from tests.syncs import SyncCounter

BATCHES, LOG_EVERY = 6, 4  # per epoch; two epochs


def _fit(tmp_path, *callbacks, log_every=LOG_EVERY, epochs=2, during=None, on_device=False, method="simclr",
         **trainer_kwargs):
    """The default method (SimCLR, its views and LARS; or ``method``) on tiny data, with the run's resume callbacks;
    returns the sync counter and the checkpoint path."""
    cfg = tiny_cfg(method, f"data.on_device={on_device}")
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    last = tmp_path / "last.ckpt"
    trainer = L.Trainer(accelerator=trainer_kwargs.pop("accelerator", "cpu"), devices=1, max_epochs=epochs,
                        limit_train_batches=BATCHES, log_every_n_steps=log_every, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
                        callbacks=[*callbacks, DataPosition(), Preemption(last), LastCheckpoint(last)])
    counter = SyncCounter(during)
    counter.attach(method, trainer)
    try:
        trainer.fit(method, datamodule=instantiate(cfg.data))
    finally:
        counter.detach()
    return counter, last


def check_batches(epochs=2):
    """0-based batches where the non-finite guard reads its flag: logging steps and the last batch of each epoch."""
    return {k for k in range(epochs * BATCHES) if (k + 1) % LOG_EVERY == 0 or (k + 1) % BATCHES == 0}


@pytest.mark.parametrize("method", ["simclr", "moco_v2", "nnclr"])  # and the queues: their write position is on the host
def test_a_training_step_reads_nothing_back_from_the_device_between_checks(tmp_path, method):
    """After the first batch (where Lightning makes its metric holders and the optimizer its state), a batch reads
    nothing back from the device except at a check: one read of the non-finite flag, and on a logging step the
    learning rate copied to the device to be logged. Lightning's own read of the progress-bar values after the batch
    is outside this window: the loss is a progress-bar value on the CPU only (src/methods/base.py)."""
    counter, _ = _fit(tmp_path, method=method)
    assert counter.batch == 2 * BATCHES - 1
    synced = {k: v for k, v in counter.events.items() if v and k > 0}
    assert set(synced) <= check_batches(), synced  # none between the checks
    for k in check_batches():
        assert counter.events[k].count("item") == 1, (k, counter.events[k])
        others = {e for e in counter.events[k] if e != "item"}
        assert others <= ({"tensor from Python data"} if (k + 1) % LOG_EVERY == 0 else set()), (k, counter.events[k])


class _NaNAt(L.Callback):
    """NaN views from optimizer step ``step`` on; optionally a SIGTERM caught at step ``signal_at``."""

    def __init__(self, step, signal_at=None):
        self.step, self.signal_at = step, signal_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for view in batch["views"]:
                view.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.signal_at:
            next(c for c in trainer.callbacks if isinstance(c, Preemption)).received = signal.SIGTERM


def test_a_nonfinite_loss_stops_at_the_next_check_naming_its_step_with_no_checkpoint_after_it(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss nan at step 1; .*nonfinite_loss=skip"):
        _fit(tmp_path, _NaNAt(1), log_every=1000)  # read back at the epoch's last batch, before its checkpoint
    assert not (tmp_path / "last.ckpt").exists()


def test_a_checkpoint_due_after_a_nonfinite_step_is_not_written(tmp_path):
    """A signal after the bad step asks for last.ckpt before the next regular check: the save checks first."""
    with pytest.raises(NonFiniteLossError, match=r"^non-finite loss nan at step 7;"):
        _fit(tmp_path, _NaNAt(7, signal_at=8), log_every=1000)  # steps 7 and 8 are in the second epoch
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["global_step"] == BATCHES  # the first epoch's checkpoint, the last good one, untouched
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_a_signal_still_stops_at_its_batch_on_one_process(tmp_path):
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM after step 3"):
        _fit(tmp_path, _NaNAt(-1, signal_at=3))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_nonfinite_watch_keeps_the_first_bad_step_and_its_terms():
    watch = NonFiniteWatch()
    assert watch.first_bad_step() is None
    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
        watch.note(torch.tensor(loss), {"a": torch.tensor(step * 10.0), "b": 0.5}, step)
    assert watch.first_bad_step() == 2
    assert watch.describe(2) == "non-finite loss inf at step 2 (a=20)"
    assert watch.first_bad_step(lambda t: torch.minimum(t, torch.tensor(1))) == 1  # another rank's earlier step
    assert watch.describe(1) == "non-finite loss at step 1 (on another process)"


def _fake_trainer(world_size, device, batches, reduces):
    def reduce_boolean_decision(decision, all=True):
        reduces.append(decision)
        return decision

    strategy = SimpleNamespace(root_device=torch.device(device), reduce_boolean_decision=reduce_boolean_decision)
    return SimpleNamespace(world_size=world_size, strategy=strategy, num_training_batches=batches, global_step=0,
                           current_epoch=0, save_checkpoint=lambda *a, **k: reduces.append("saved"))


def test_preemption_reduces_the_flag_every_n_batches_on_accelerators_and_every_batch_on_cpus(tmp_path):
    reduces: list = []
    gpu = _fake_trainer(2, "cuda", 25, reduces)
    cb = Preemption(tmp_path / "last.ckpt", check_every_n_batches=10)
    checked = []
    for batch_idx in range(25):
        before = len(reduces)
        cb.on_train_batch_end(gpu, None, None, None, batch_idx)
        checked += [batch_idx] * (len(reduces) - before)
    assert checked == [9, 19, 24]  # every 10th batch and the epoch's last
    cb.on_train_epoch_end(gpu, None)
    assert len(reduces) == 4
    cb.received = signal.SIGUSR1  # caught during batch 3: checkpoint and stop at the next check (batch 9)
    with pytest.raises(RunInterrupted, match="SIGUSR1"):
        for batch_idx in range(3, 25):
            cb.on_train_batch_end(gpu, None, None, None, batch_idx)
    assert batch_idx == 9 and reduces[-1] == "saved"

    reduces.clear()
    cpu, one = _fake_trainer(2, "cpu", 25, reduces), _fake_trainer(1, "cuda", 25, reduces)
    cb = Preemption(tmp_path / "last.ckpt", check_every_n_batches=10)
    for batch_idx in range(25):
        cb.on_train_batch_end(cpu, None, None, None, batch_idx)
        cb.on_train_batch_end(one, None, None, None, batch_idx)  # one process: the flag is read with no reduce
    assert len(reduces) == 25


# ---- data.on_device=true -----------------------------------------------------------------------------------------
def _datamodule(*overrides):
    cfg = tiny_cfg("simclr", *overrides)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def test_on_device_batches_are_the_loaders_batches_bit_for_bit_also_after_a_mid_epoch_resume():
    torch.manual_seed(3)  # the run seed the loaders read (torch.initial_seed())
    host, dev = _datamodule("data.max_train_samples=100"), _datamodule("data.max_train_samples=100", "data.on_device=true")
    a, b = host.train_dataloader(), dev.train_dataloader()
    assert len(a) == len(b) == 100 // 16 and b.batch_size == 16
    for epoch in (0, 1):
        a.sampler.set_epoch(epoch)
        b.sampler.set_epoch(epoch)
        pairs = list(zip(a, b, strict=True))
        assert len(pairs) == 6
        for (xa, ya), (xb, yb) in pairs:
            assert xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)
    for loader in (a, b):  # resumed 2 batches into epoch 1
        loader.sampler.set_epoch(1)
        loader.sampler.skip_once(1, 2 * 16)
    rest = list(zip(a, b, strict=True))
    assert len(rest) == 4 and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in rest)
    assert torch.equal(rest[0][0][0], pairs[2][0][0])


def test_on_device_training_ends_with_the_same_weights(tmp_path):
    states = []
    for on_device in (False, True):
        _, last = _fit(tmp_path / str(on_device), on_device=on_device)
        states.append(torch.load(last, weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("overrides, words", [
    (["data=imagefolder", "data.root=/tmp", "+data.on_device=true"], "data=imagefolder is read from files, not held in memory; set "
                                             "data.on_device=false"),
    (["data.num_workers=2"], "data.num_workers=2; set data.num_workers=0"),
    (["data=digits", "data.captions=class_prompts"], "captions are read from files"),
])
def test_on_device_refuses_data_it_cannot_hold_in_one_line(overrides, words):
    from src.utils.errors import UserError

    cfg = tiny_cfg("simclr", *overrides, *([] if "+data.on_device=true" in overrides else ["data.on_device=true"]))
    with pytest.raises(Exception) as info:
        instantiate(cfg.data)
    error = info.value if isinstance(info.value, UserError) else info.value.__cause__
    assert isinstance(error, UserError) and words in str(error) and "\n" not in str(error)


# ---- method.compile, fused optimizers ------------------------------------------------------------------------------
def test_compile_option_compiles_the_backbone_in_place_and_training_runs(tmp_path, monkeypatch):
    """Inductor takes minutes to build CPU kernels on this machine, so the compile call is given dynamo's "eager"
    backend here (the graph is traced, then run by PyTorch); tests/test_gpu.py runs inductor itself."""
    compiled, original = [], torch.nn.Module.compile

    def traced_only(self, *args, **kwargs):
        compiled.append(self)
        return original(self, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", traced_only)
    cfg = tiny_cfg("simclr", "+method.compile=true")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    keys = set(method.state_dict())
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert compiled == [method.backbone] and method.backbone._compiled_call_impl is not None
    assert set(method.state_dict()) == keys and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    import src.methods.base as base
    import src.nn.optim as optim

    monkeypatch.setattr(optim.shutil, "which", lambda name: None)
    cfg = tiny_cfg("simclr", "+method.compile=true")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(base.UserError, match=r"^method.compile=true: inductor needs a C\+\+ compiler .*; set "
                                             r"method.compile=false$"):
        trainer.fit(method, datamodule=instantiate(cfg.data))


def test_fused_optimizers_only_for_torchs_adam_adamw_sgd_on_cuda_tensors():
    from functools import partial

    from src.nn.optim import LARS, fusable

    cuda = [SimpleNamespace(is_cuda=True, is_sparse=False)] * 2
    assert fusable(partial(torch.optim.AdamW, lr=1.0), cuda) and fusable(partial(torch.optim.Adam, lr=1.0), cuda)
    assert fusable(partial(torch.optim.SGD, lr=1.0), cuda)  # torch >= 2.4 has a fused SGD
    assert not fusable(partial(LARS, lr=1.0), cuda)  # the project's own: no fused kernel
    assert not fusable(partial(torch.optim.AdamW, lr=1.0, fused=False), cuda)  # the config's choice stands
    assert not fusable(partial(torch.optim.AdamW, lr=1.0), [torch.zeros(1)])  # CPU tensors
    assert not fusable(partial(torch.optim.AdamW, lr=1.0), [*cuda, torch.zeros(1)])


def test_preflight_reports_the_on_device_refusals_as_one_line_each():
    from src.config.command_line import problems_for

    assert problems_for(["data=stl10", "data.root=/tmp", "data.on_device=true"]) == [
        "data.on_device=true cuts batches on the device with no loader workers, but data.num_workers=4; set "
        "data.num_workers=0"]
    assert problems_for(["data=digits", "data.on_device=true", "data.batch_size=64", "trainer.max_epochs=1"]) == []
