"""One "node" of a 2-node run on localhost (tests/test_multinode.py): Lightning's DDP over gloo with the node rank,
master address and port from the environment, as on a cluster without SLURM. Runs one SimCLR step (BatchNorm-free
model, deterministic views) and saves this rank's local loss and the DDP-averaged gradients to ``$OUT/rank<r>.pt``."""

import os
import sys

import lightning as L
import torch

from src.data.datamodule import SSLDataModule
from tests.test_distributed import make


class FixedViews(torch.nn.Module):
    """Two deterministic views (the image and its mirror), so that both runs see the same views."""

    def forward(self, images):
        x = images.float() / 255.0
        return [x, x.flip(-1)]

    def eval_view(self, images):
        return images.float() / 255.0


class Record(L.Callback):
    def __init__(self):
        self.out = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.out["grads"] = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out["loss"] = outputs["loss"].detach().clone()


def model():
    method = make("simclr", "method.proj_layers=1")
    method.views = FixedViews()
    return method


def datamodule(batch_size: int) -> SSLDataModule:
    return SSLDataModule("fake", image_size=4, channels=3, num_classes=10, batch_size=batch_size, mean=[0.5] * 3,
                         std=[0.5] * 3)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[record])
    trainer.fit(model(), datamodule=datamodule(4))
    torch.save(record.out, os.path.join(os.environ["OUT"], f"rank{trainer.global_rank}.pt"))
    sys.exit(0)
