"""What the pretext tasks share: one view per image, pseudo-labels made from it on the device.

A pretext method reads the (normalised) global views as one batch of images (:meth:`PretextTask.images`),
builds its labels from them (rotations, patch positions, permutations, masks, Lab colours), and returns
``(loss, {"pretext_acc": ...})`` where the task is a classification. The backbone is what evaluation
measures; task heads and decoders belong to the method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from src.backbones.vit import has_token_api, require_token_api
from src.methods.base import SSLMethod
from src.nn.multicrop import num_global_views


def crop_size(cfg: DictConfig) -> int | None:
    """The size of the views the task sees (views.crops[0].size), or None when it cannot be resolved."""
    try:
        return int(OmegaConf.select(cfg, "views.crops.0.size"))
    except Exception:  # noqa: BLE001 - a missing or unresolvable size is reported elsewhere
        return None


def colour_problems(cls: type, cfg: DictConfig) -> list[str]:
    """One line when the data is not RGB (colorization and split-brain predict colour from lightness)."""
    channels = cfg.data.get("channels")
    if channels == 3:
        return []
    return [f"{cls.__name__} needs colour (RGB) images but data={cfg.data.get('name')} has data.channels={channels}; "
            "use a colour dataset such as data=cifar10, data=stl10 or data=imagefolder"]


def token_backbone_problems(cls: type, cfg: DictConfig) -> list[str]:
    """One line when the backbone has no ViT token API (MAE and BEiT encode patch tokens)."""
    from hydra.utils import get_class

    try:
        backbone_cls = get_class(cfg.backbone._target_)
    except Exception:  # noqa: BLE001 - a bad backbone target is reported by the schema check
        return []
    if has_token_api(backbone_cls):
        return []
    return [f"{cls.__name__} needs a ViT backbone with the token API: use backbone=vit_cpu (CPU-sized), vit_tiny, "
            f"vit_small or vit_base; {backbone_cls.__name__} has none"]


def mask_ratio_problems(ratio) -> list[str]:
    if isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 < ratio < 1:
        return []
    return [f"method.mask_ratio={ratio} must be in (0, 1): the share of patches hidden from the encoder"]


def correct_fraction(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy (a fraction) of ``logits`` (N x K) against ``labels`` (N,)."""
    return (logits.argmax(dim=1) == labels).float().mean()


class PretextTask(SSLMethod):
    """SSLMethod for tasks that need one view per image and no negatives."""

    min_global_batch = 1
    min_views = 1
    needs_colour = False  # colorization and split-brain predict colour from lightness: RGB data only
    needs_tokens = False  # MAE and BEiT encode ViT patch tokens: a backbone with the token API only

    def __init__(self, backbone, views, optimizer, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if self.needs_tokens:
            require_token_api(backbone, type(self).__name__)

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        problems += colour_problems(cls, cfg) if cls.needs_colour else []
        return problems + (token_backbone_problems(cls, cfg) if cls.needs_tokens else [])

    def images(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The global views as one batch (B' x C x S x S, normalised): more than one view per image only
        adds samples."""
        return torch.cat(views[: num_global_views(views)])

    @staticmethod
    @contextlib.contextmanager
    def fixed_randomness(x: torch.Tensor, seed: int = 0) -> Iterator[None]:
        """The same random masks / holes at every call (pictures of fixed images), leaving training's RNG streams
        of ``x``'s device as they were."""
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised views back to [0, 1] colours."""
        return self.views.denormalize(x).clamp(0, 1)
