"""Pictures drawn during training, on a fixed set of held-out images, with one output rule:
``<run>/pictures/<what>_<epoch, 4 digits>.png`` and the W&B image key ``<what>``.

- :class:`PretextPictures` (``what = pretext``): methods that can draw their task (inpainting, colorization,
  split-brain, MAE, BEiT, the VQ-VAE tokenizer) define ``pictures(x) -> {row name: (N, C, H, W) floats in [0, 1]}``
  for a batch ``x`` of evaluation views; the rows are stacked into one grid. Other methods are left alone.
- :class:`AttentionMaps` (``what = attention``): ViT backbones (``last_attention``): one row per image, the image
  then each head's CLS attention over the patch grid as a heat map, upsampled onto the image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torchvision.utils import make_grid, save_image

from src.protocols.features import eval_mode, evaluated_backbone


def held_out_images(trainer: L.Trainer, num: int) -> torch.Tensor:
    """``num`` evenly spaced images (uint8) of the evaluation split (or the held-out image–caption pairs, or the
    training set, without one): the same ones at every call."""
    dm = trainer.datamodule
    dataset = next(d for d in (getattr(dm, "eval_val", None), getattr(dm, "pairs", None), dm.pretrain) if d is not None)
    n = min(num, len(dataset))
    idx = torch.linspace(0, len(dataset) - 1, n).round().long().tolist()
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in idx])


def save_picture(trainer: L.Trainer, what: str, grid: torch.Tensor, caption: str, epoch: int | None = None) -> Path:
    """Write ``grid`` (C x H x W in [0, 1]) to ``<run>/pictures/<what>_<epoch>.png`` and to W&B under ``what``;
    ``epoch`` (1-based) defaults to the one ending now."""
    epoch = trainer.current_epoch + 1 if epoch is None else epoch
    path = Path(trainer.default_root_dir) / "pictures" / f"{what}_{epoch:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    caption = f"epoch {epoch}, {caption}"
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=what, images=[grid], caption=[caption], step=trainer.global_step)
    rank_zero_info(f"pictures: {path} ({caption})")
    return path


def heat(x: torch.Tensor) -> torch.Tensor:
    """A heat colour map: (N, 1, H, W) in [0, 1] -> (N, 3, H, W), black -> red -> yellow -> white."""
    x = x.clamp(0, 1)
    return torch.cat([(3 * x).clamp(0, 1), (3 * x - 1).clamp(0, 1), (3 * x - 2).clamp(0, 1)], dim=1)


class _Pictures(L.Callback, ABC):
    """Every ``every_n_epochs`` epochs and after the last one (``None``: only after the last one), ``num_images``
    held-out images are drawn in eval mode (on every rank) and saved by rank 0; ``self.saved`` lists the files."""

    what = "pictures"

    def __init__(self, every_n_epochs: int | None = 1, num_images: int = 8):
        if (every_n_epochs is not None and every_n_epochs < 1) or num_images < 1:
            raise ValueError(f"eval.{self.what}: every_n_epochs={every_n_epochs} and num_images={num_images} "
                             "must be >= 1")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.saved: list[Path] = []

    @abstractmethod
    def applies(self, pl_module: L.LightningModule) -> bool:
        """Whether this method (or its backbone) can be drawn at all."""

    @abstractmethod
    def draw(self, pl_module: L.LightningModule, x: torch.Tensor) -> tuple[torch.Tensor, str]:
        """(grid C x H x W in [0, 1], caption) for normalised evaluation views ``x``."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        due = epoch == trainer.max_epochs or (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0)
        if not due or not self.applies(pl_module):
            return
        # every rank draws (a sharded model, hardware=fsdp, needs all ranks in its forward pass); rank 0 saves
        images = held_out_images(trainer, self.num_images).to(pl_module.device)
        with eval_mode(pl_module), torch.no_grad():
            grid, caption = self.draw(pl_module, pl_module.views.eval_view(images))
        if trainer.is_global_zero:
            self.saved.append(save_picture(trainer, self.what, grid, caption))


class PretextPictures(_Pictures):
    """Input / prediction / target rows (as the method names them) of the pretext task."""

    what = "pretext"

    def applies(self, pl_module):
        return callable(getattr(pl_module, "pictures", None))

    def draw(self, pl_module, x):
        rows = pl_module.pictures(x)
        grid = make_grid(torch.cat([r.float().clamp(0, 1).cpu() for r in rows.values()]), nrow=x.shape[0],
                         padding=2, pad_value=1.0)
        return grid, "rows: " + " / ".join(rows)


class AttentionMaps(_Pictures):
    """The last block's CLS attention of a ViT backbone, per head, over the patches of each image (each head's
    map scaled to its own maximum for display). ``self.maps`` keeps the last maps drawn (N x heads x h x w, each
    summing to 1 over the patches)."""

    what = "attention"

    def applies(self, pl_module):
        """A ViT that reads the views as they are (not colorization's L channel, say)."""
        backbone = evaluated_backbone(pl_module)
        return callable(getattr(backbone, "last_attention", None)) and \
            getattr(backbone, "in_channels", None) == pl_module.views.mean.numel()

    def draw(self, pl_module, x):
        maps = evaluated_backbone(pl_module).last_attention(x).float()  # N x heads x h x w
        self.maps = maps.cpu()
        N, heads = maps.shape[:2]
        up = F.interpolate(maps.reshape(N * heads, 1, *maps.shape[-2:]), size=x.shape[-2:], mode="nearest")
        up = up / up.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        image = pl_module.views.denormalize(x).clamp(0, 1).float()
        image = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image  # N x 3 x H x W
        tiles = torch.cat([image.unsqueeze(1), heat(up).reshape(N, heads, 3, *x.shape[-2:])], dim=1)  # N x 1+heads
        grid = make_grid(tiles.reshape(-1, 3, *x.shape[-2:]).cpu(), nrow=1 + heads, padding=2, pad_value=1.0)
        return grid, f"rows: images; columns: the image, then the CLS attention of heads 1-{heads} of the last block"
