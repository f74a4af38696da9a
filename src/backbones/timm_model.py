"""Any timm architecture as a backbone (``backbone=timm backbone.name=convnext_tiny``): pooled features out.

``pretrained`` is a local weights file (a timm or torchvision state dict, or a training checkpoint; prefixes
are handled, see :mod:`src.backbones.pretrained`), or ``true`` for timm's own weights of ``name``, which timm
downloads from its hub (internet needed; no test or default run does that). ``model_kwargs`` go to
``timm.create_model`` (e.g. ``{img_size: 32, patch_size: 4}`` for a timm ViT on small crops).
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from src.backbones.pretrained import load_pretrained, pretrained_problems
from src.utils.errors import UserError


class TimmBackbone(nn.Module):
    def __init__(self, name: str | None = None, in_channels: int = 3, pretrained: str | bool | None = None,
                 model_kwargs: dict | None = None):
        super().__init__()
        import timm

        if problem := timm_name_problem(name):
            raise UserError(problem)
        hub = pretrained is True
        try:
            self.net = timm.create_model(name, pretrained=hub, num_classes=0, in_chans=in_channels,
                                         **(model_kwargs or {}))
        except TypeError as e:
            raise UserError(f"backbone.model_kwargs={model_kwargs} do not fit timm's {name}: {e}") from e
        except (OSError, RuntimeError) as e:
            if not hub:
                raise
            raise UserError(f"could not fetch timm's pretrained weights for {name} ({type(e).__name__}); without "
                            "internet, download them elsewhere and pass backbone.pretrained=/path/to/weights") from e
        if isinstance(pretrained, str) and pretrained:
            load_pretrained(self.net, pretrained, f"timm's {name}")
        self.out_dim = self.net.num_features
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # B x out_dim (timm's own pooling, classifier removed)

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        b = cfg.backbone
        problem = timm_name_problem(b.get("name"))
        return ([problem] if problem else []) + pretrained_problems(b.get("pretrained"))


def timm_name_problem(name) -> str | None:
    """One line when ``name`` (optionally with a ``.tag``) is not a timm architecture, with the closest names."""
    import timm

    if not isinstance(name, str) or not name:
        return "backbone.name is not set: pass a timm architecture, e.g. backbone.name=convnext_tiny"
    base = name.split(".", 1)[0]
    if timm.is_model(base):
        return None
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    return f"backbone.name={name} is not a timm architecture; {hint}"
