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
