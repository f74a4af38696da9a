"""GPU checks: skipped without CUDA (CI has none); run them on a lent GPU machine with `pytest -m gpu`."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from tests.helpers import METHODS, tiny_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "32-true"])
@pytest.mark.parametrize("name", METHODS)
def test_views_run_on_the_gpu_and_training_steps_are_finite(name, precision):
    cfg = tiny_cfg(name)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    seen = {}

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["device"] = batch["views"][0].device.type
            seen["loss"] = float(outputs["loss"])

    trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Check()])
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert seen["device"] == "cuda" and torch.isfinite(torch.tensor(seen["loss"]))


@pytest.mark.parametrize("name, overrides", [("dino", ["views.crops.2.size=8"]), ("moco_v3", [])])
def test_joint_embedding_methods_run_on_a_vit_on_the_gpu_in_bf16(name, overrides):
    cfg = tiny_cfg(name, *overrides, vit=True)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    maps = method.backbone.to("cuda").last_attention(torch.randn(2, 3, 16, 16, device="cuda"))
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 2, device="cuda"))


def test_fsdp_trains_a_vit_and_writes_a_full_checkpoint(tmp_path):
    """hardware=fsdp on the visible GPU(s): MAE on a small ViT, blocks sharded, a full (unsharded) last.ckpt that
    src.eval-style loading reads on the CPU."""
    from tests.helpers import run_cli

    proc = run_cli("hardware=fsdp", "precision=bf16", "method=mae", "backbone=vit_cpu", "backbone.embed_dim=64",
                   "backbone.depth=2", "backbone.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                   "method.decoder_heads=2", "data=digits", "data.batch_size=64", "trainer.max_epochs=1",
                   "eval=final_only", "eval.final.linear_epochs=5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["state_dict"]["backbone.net.blocks.0.attn.qkv.weight"].shape == (192, 64)  # gathered, not a shard


@pytest.mark.parametrize("on_device", [False, True])
def test_training_steps_between_checks_never_wait_for_the_gpu(tmp_path, on_device):
    """CUDA's sync debug mode is "error" in every batch (views, step, callbacks' batch hooks, the throughput monitor)
    after the first, except where the non-finite guard reads its flag (tests/test_fastpath.py): any host-device sync
    there raises."""
    import contextlib

    from tests.test_fastpath import _fit, check_batches

    @contextlib.contextmanager
    def strict(batch):
        torch.cuda.set_sync_debug_mode("error" if batch > 0 and batch not in check_batches() else 0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    from src.callbacks.throughput import ThroughputMonitor

    throughput = ThroughputMonitor()  # times windows of steps, synchronising only where the guard reads its flag
    counter, last = _fit(tmp_path, throughput, during=strict, accelerator="gpu", on_device=on_device)
    assert counter.batch == 11 and last.is_file() and throughput.results["train_images_per_s"] > 0


def test_compile_and_fused_adamw_train_on_the_gpu():
    """method.compile=true with inductor (Triton kernels) and MAE's AdamW built fused on CUDA parameters."""
    cfg = tiny_cfg("mae", "+method.compile=true")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert method.backbone._compiled_call_impl is not None and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.optimizers[0].defaults["fused"] is True
