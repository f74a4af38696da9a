"""Load weights a user downloaded elsewhere (timm, torchvision, DINO, MAE, MoCo, CLIP towers, our own
checkpoints) into a backbone's inner network, whatever prefix the file puts in front of the names.

The file is read safely (``torch.load(weights_only=True)``, or safetensors): tensors and plain values only.
Nested checkpoints are unwrapped (``state_dict``, ``model``, ``teacher``, ``module``, ...), then the prefix that
makes the most names match the network is dropped (``module.``, ``backbone.``, ``module.encoder_q.``,
``backbone.net.`` ...). Names the network does not have (classifier heads, projectors, a teacher) are ignored and
counted; a network parameter the file lacks, or one of another shape, is one clear error line. ``adapt`` may fix
shapes first (a ViT's position embedding resampled to another grid).

DINOv2's own files (``DinoVisionTransformer.state_dict()``: the hub's ``dinov2_vits14_pretrain.pth``, or the
``teacher`` of a training checkpoint, whose blocks may be chunked as ``blocks.<chunk>.<block>.``) are read by name:
LayerScale ``blocks.N.ls1.gamma``, ``mask_token``, ``register_tokens`` and the 518 px (37 x 37) position
embedding, resampled to the ViT's grid as DINOv2's ``interpolate_pos_encoding`` does (bicubic, no antialiasing,
``interpolate_offset`` 0.1). A file with LayerScale or registers that the configured ViT lacks, another patch size,
or ViT-g's SwiGLU feed-forward is one clear line naming the setting to change.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from src.utils.errors import UserError

NESTED = ("state_dict", "model", "teacher", "module", "net", "encoder", "backbone", "student")


def pretrained_problems(pretrained) -> list[str]:
    """A ``backbone.pretrained`` path that is not a file (the shapes are checked when the backbone is built)."""
    if isinstance(pretrained, str) and pretrained and not Path(pretrained).is_file():
        return [f"backbone.pretrained={pretrained} is not a file; pass the path of a weights file (.pth, .pt, .ckpt, "
                ".bin or .safetensors)"]
    return []


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The flat name -> tensor mapping of a weights file (``.pth``/``.pt``/``.ckpt``/``.bin`` or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone.pretrained={path} is not a file; pass the path of a weights file (.pth, .pt, "
                        ".ckpt, .bin or .safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"backbone.pretrained={path} is not a readable safetensors file ({e})") from e
    if not zipfile.is_zipfile(path):
        raise UserError(f"backbone.pretrained={path} is not a torch.save archive or a .safetensors file; pass a "
                        "weights file (state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors name the offending global
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"backbone.pretrained={path} could not be loaded safely (weights_only=True): {first}") from e
    return _flatten(state, path)


def _flatten(state, path: Path) -> dict[str, Tensor]:
    for _ in range(4):  # {"state_dict": {...}}, {"teacher": {...}}, {"model": {"module": ...}} ...
        if isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values()):
            return state
        if not isinstance(state, dict):
            break
        inner = next((state[k] for k in NESTED if isinstance(state.get(k), dict) and state[k]), None)
        if inner is None:
            break
        state = inner
    raise UserError(f"backbone.pretrained={path} holds no state dict (a mapping of names to tensors); pass a weights "
                    "file such as a torchvision/timm state dict or a training checkpoint")


def match_prefix(source: dict[str, Tensor], target: set[str]) -> tuple[str, dict[str, Tensor]]:
    """(prefix, renamed): the leading ``a.b.`` prefix of ``source``'s names whose removal makes the most names
    land in ``target`` (ties: the shortest), and the tensors of those names without it."""
    counts: dict[str, int] = {}
    for key in source:
        parts = key.split(".")
        for i in range(len(parts)):
            prefix = ".".join(parts[:i]) + ("." if i else "")
            if key[len(prefix):] in target:
                counts[prefix] = counts.get(prefix, 0) + 1
    if not counts:
        return "", {}
    prefix = max(counts, key=lambda p: (counts[p], -len(p)))
    return prefix, {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix) and k[len(prefix):] in target}


def adapt_input_channels(value: Tensor, want: Tensor) -> Tensor:
    """A first convolution of RGB weights for a grayscale network (the 3 input channels summed: the response to a
    gray image stays the same) or of grayscale weights for an RGB one (repeated and divided by 3); any other shape
    is returned unchanged."""
    if value.ndim == 4 and want.ndim == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]:
        if (value.shape[1], want.shape[1]) == (3, 1):
            return value.sum(dim=1, keepdim=True)
        if (value.shape[1], want.shape[1]) == (1, 3):
            return value.repeat(1, 3, 1, 1) / 3
    return value


def load_pretrained(net: nn.Module, path: str | Path, what: str,
                    adapt: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
                    prepare: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> dict[str, Tensor]:
    """Load the weights file ``path`` into ``net`` (every parameter and buffer of ``net`` must be found, with its
    shape); ``what`` names the backbone in messages, ``prepare`` may rename the file's tensors before the prefix is
    matched, ``adapt`` may reshape the renamed tensors after. Returns the file's tensors under the matched prefix that
    ``net`` has no place for (names without the prefix), e.g. DINOv2's ``mask_token``."""
    source = read_state_dict(path)
    if prepare is not None:
        source = prepare(source)
    want = net.state_dict()
    prefix, found = match_prefix(source, set(want))
    if not found:
        example = next(iter(source))
        raise UserError(f"backbone.pretrained={path}: none of its {len(source)} tensors (e.g. {example}) is a weight "
                        f"of {what} (e.g. {next(iter(want))}); is it a checkpoint of another architecture?")
    if adapt is not None:
        found = adapt(found)
    found = {k: adapt_input_channels(v, want[k]) for k, v in found.items()}
    missing = [k for k in want if k not in found and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(v.shape)} instead of {tuple(want[k].shape)}" for k, v in found.items()
              if v.shape != want[k].shape]
    if missing or shapes:
        parts = [f"{len(missing)} of its weights are missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(shapes)} have another shape (e.g. {shapes[0]})"] if shapes else []
        raise UserError(f"backbone.pretrained={path} does not fit {what}: {' and '.join(parts)}; pass weights of the "
                        "same architecture and size (or change the backbone.* settings to those of the file)")
    net.load_state_dict(found, strict=False)
    unused = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix) and k[len(prefix):] not in want}
    ignored = len(source) - len(found)
    rank_zero_info(f"backbone: loaded {len(found)} tensors from {path}" + (f" (prefix '{prefix}' dropped)" if prefix else "")
                   + (f"; {ignored} tensors of the file are not part of {what} and were ignored" if ignored else ""))
    return unused


# ---- DINOv2's layout ----------------------------------------------------------------------------------
def is_dinov2(source: dict[str, Tensor]) -> bool:
    """Whether a flat state dict is a DINOv2 ``DinoVisionTransformer`` (any prefix): it has a ``mask_token`` and
    transformer blocks (timm's ViTs have no mask token; timm's DINOv2 conversions rename it away)."""
    return any(k == "mask_token" or k.endswith(".mask_token") for k in source) and any("blocks." in k for k in source)


_CHUNKED = re.compile(r"(^|\.)blocks\.\d+\.(\d+)\.")


def dinov2_names(source: dict[str, Tensor], path) -> dict[str, Tensor]:
    """DINOv2's names as the plain ViT has them: chunked blocks (``block_chunks > 0``, FSDP training) are
    ``blocks.<chunk>.<block>.`` -> ``blocks.<block>.``. ViT-g's SwiGLU feed-forward has no counterpart here."""
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in source):
        raise UserError(f"backbone.pretrained={path} is a DINOv2 ViT with a SwiGLU feed-forward (ViT-g/14); "
                        "backbone=vit_* has a GELU MLP: use DINOv2's ViT-S/14, B/14 or L/14 weights")
    return {_CHUNKED.sub(r"\1blocks.\2.", k): v for k, v in source.items()}


def dinov2_adapt(found: dict[str, Tensor], net: nn.Module, grid: tuple[int, int], patch_size: int,
                 path) -> dict[str, Tensor]:
    """DINOv2 tensors shaped for ``net``: its position embedding (CLS + M x M patches, M = 37 for 518 px crops of 14
    px patches) resampled to ``grid`` as DINOv2's ``interpolate_pos_encoding`` does; a patch projection of another
    patch size is refused (DINOv2 never resizes its kernels)."""
    out = dict(found)
    proj = out.get("patch_embed.proj.weight")
    if proj is not None and proj.shape[-1] != patch_size:
        raise UserError(f"backbone.pretrained={path} cuts images into {proj.shape[-1]} px patches but "
                        f"backbone.patch_size={patch_size}: set backbone.patch_size={proj.shape[-1]} and crops that are "
                        f"multiples of it (e.g. data.crop_size={16 * proj.shape[-1]})")
    pos = out.get("pos_embed")
    if pos is not None:
        m = round(math.sqrt(pos.shape[1] - 1))
        if m * m != pos.shape[1] - 1:
            raise UserError(f"backbone.pretrained={path}: its position embedding has {pos.shape[1] - 1} patch "
                            "positions, not a square grid")
        if (m, m) != tuple(grid):
            out["pos_embed"] = resample_dinov2_positions(pos, grid)
    return out


def resample_dinov2_positions(pos: Tensor, grid: tuple[int, int], offset: float = 0.1) -> Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + h*w, D): the patch part resized bicubically with scale factors ((h + offset) / M,
    (w + offset) / M) and no antialiasing (DINOv2's ``interpolate_pos_encoding``), the CLS position kept."""
    m = round(math.sqrt(pos.shape[1] - 1))
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()  # 1 x D x M x M
    h, w = grid
    patch = F.interpolate(patch, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (h, w), (patch.shape, grid)
    return torch.cat([pos[:, :1].float(), patch.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1).to(pos.dtype)


def dinov2_unused_problems(unused: dict[str, Tensor], path) -> None:
    """A DINOv2 file whose LayerScale or register tokens the configured ViT has no place for would lose them
    silently: one line naming the setting instead."""
    gammas = sorted(k for k in unused if k.endswith(("ls1.gamma", "ls2.gamma")))
    if gammas:
        raise UserError(f"backbone.pretrained={path} has LayerScale ({gammas[0]}) but this ViT has none: set "
                        "backbone.init_values=1.0e-5 (DINOv2's layerscale)")
    if "register_tokens" in unused:
        n = unused["register_tokens"].shape[1]
        raise UserError(f"backbone.pretrained={path} has {n} register tokens but this ViT has none: set "
                        f"backbone.reg_tokens={n}")
