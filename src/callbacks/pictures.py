"""Pictures of a pretext task: input / prediction / target rows for a fixed set of held-out images.

Methods that can draw their task (inpainting, colorization, split-brain) define
``pictures(x) -> {row name: (N, C, H, W) floats in [0, 1]}`` for a batch ``x`` of evaluation views; the
rows are stacked into one grid. Other methods are left alone.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import make_grid, save_image

from src.callbacks.features import eval_mode


class PretextPictures(L.Callback):
    """Every ``every_n_epochs`` epochs and after the last one (``None``: only after the last one), rank 0 draws
    ``num_images`` evenly spaced held-out images (the same ones every time) through ``pl_module.pictures`` in
    eval mode, saves the grid as ``<run>/pictures/epoch_<epoch, 4 digits>.png`` and logs it to W&B under
    ``pictures``. ``self.saved`` lists the files written."""

    def __init__(self, every_n_epochs: int | None = 1, num_images: int = 8):
        if (every_n_epochs is not None and every_n_epochs < 1) or num_images < 1:
            raise ValueError(f"eval.pictures: every_n_epochs={every_n_epochs} and num_images={num_images} "
                             "must be >= 1")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.saved: list[Path] = []

    def _images(self, trainer: L.Trainer) -> torch.Tensor:
        dm = trainer.datamodule
        dataset = getattr(dm, "eval_val", None) or dm.pretrain
        n = min(self.num_images, len(dataset))
        idx = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
        return torch.stack([torch.as_tensor(dataset[i][0]) for i in idx])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = epoch == trainer.max_epochs or (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0)
        if not hasattr(pl_module, "pictures") or not due or not trainer.is_global_zero:
            return
        images = self._images(trainer).to(pl_module.device)
        with eval_mode(pl_module), torch.no_grad():
            rows = pl_module.pictures(pl_module.views.eval_view(images))
        grid = make_grid(torch.cat([r.float().clamp(0, 1).cpu() for r in rows.values()]), nrow=images.shape[0],
                         padding=2, pad_value=1.0)
        path = Path(trainer.default_root_dir) / "pictures" / f"epoch_{epoch:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        self.saved.append(path)
        caption = f"epoch {epoch}, rows: " + " / ".join(rows)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="pictures", images=[grid], caption=[caption], step=trainer.global_step)
        rank_zero_info(f"pictures: {path} ({caption})")
