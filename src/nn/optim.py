"""Optimizer pieces: weight-decay parameter groups, the fused-kernel and compile checks, and LARS (You et al. 2017,
"Large Batch Training of Convolutional Networks"), as used by SimCLR/BYOL."""

from __future__ import annotations

import inspect
import math
import re
import shutil
from collections.abc import Callable

import torch
from torch import nn

from src.utils.errors import UserError


def decay_groups(params, **options) -> list[dict]:
    """Two optimizer groups of the trainable ``params``: weights, and biases/norms (ndim <= 1) without
    weight decay or LARS adaptation. ``options`` are added to both (e.g. ``fixed_lr=True``)."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, **options}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **options}]


# a ViT's embedding parameters (layer 0 under layer-wise decay): patch projection and tokens
EMBEDDING = ("patch_embed", "cls_token", "pos_embed", "reg_token", "register_tokens", "mask_token")
# tokens without weight decay (timm's VisionTransformer.no_weight_decay and DINOv2's/iBOT's extra tokens)
NO_DECAY_TOKENS = ("cls_token", "pos_embed", "reg_token", "dist_token", "register_tokens", "mask_token")


def layer_ids(model: nn.Module) -> dict[str, int]:
    """ViT depth of each parameter: 0 for the patch embedding and tokens, i + 1 for block i, L + 1 for the rest
    (final norm); empty when the model has no ``blocks.<i>`` (not a ViT). As MAE's ``get_layer_id_for_vit``."""
    names = [n for n, _ in model.named_parameters()]
    blocks = {n: int(m.group(1)) for n in names if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", n))}
    if not blocks:
        return {}
    depth = max(blocks.values()) + 1
    return {n: blocks[n] + 1 if n in blocks else 0 if any(e in n for e in EMBEDDING) else depth + 1 for n in names}


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters kept out of weight decay by name: what each submodule's ``no_weight_decay()``
    lists (timm: ``pos_embed``, ``cls_token``, ...) and the tokens of :data:`NO_DECAY_TOKENS`."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names | {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in NO_DECAY_TOKENS}


def finetune_param_groups(model: nn.Module, head: nn.Module, weight_decay: float,
                          layer_decay: float | None) -> list[dict]:
    """Optimizer groups for fine-tuning ``model`` with a new ``head``, each with its learning-rate scale
    (``lr_scale``), as MAE's ``param_groups_lrd`` (and BEiT's, DeiT's) build them:

    - every parameter of ``model`` is trained: those frozen in pre-training (sin-cos positions, MoCo v3's patch
      projection) are unfrozen here (``requires_grad`` set), as MAE / DeiT fine-tuning trains them;
    - no weight decay on biases and norms (ndim <= 1) nor on the tokens and position embedding
      (:func:`no_weight_decay_names`: timm's ``no_weight_decay()``);
    - ``layer_decay`` (ViTs only): block i of L gets ``layer_decay^(L + 1 - i)`` of the rate, the patch embedding and
      tokens ``layer_decay^(L + 1)``, the final norm and the head 1."""
    model.requires_grad_(True)
    ids = layer_ids(model) if layer_decay is not None else {}
    if layer_decay is not None and not ids:
        raise UserError(f"protocols.finetune.layer_decay={layer_decay} is for ViT backbones (blocks.<i>); this "
                        "backbone has none, set it to null")
    top = max(ids.values(), default=0)
    no_decay = no_weight_decay_names(model)
    groups: dict[tuple[float, bool], list] = {}
    named = [*model.named_parameters(), *(("head." + n, p) for n, p in head.named_parameters())]
    for name, p in named:
        if not p.requires_grad:
            continue
        scale = layer_decay ** (top - ids[name]) if name in ids else 1.0
        groups.setdefault((scale, p.ndim <= 1 or name in no_decay), []).append(p)
    return [{"params": ps, "lr_scale": scale, "weight_decay": 0.0 if skip else weight_decay}
            for (scale, skip), ps in groups.items()]


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile``'s default backend (inductor) cannot build kernels for ``device`` here, or None."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs Triton for CUDA and it is not installed (pip install triton)"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler for the CPU and none was found (install g++)"
    return None


def fusable(factory: Callable, params: list[torch.Tensor]) -> bool:
    """Whether ``factory`` (a partial of the configured optimizer) builds torch's Adam, AdamW or SGD, whose fused
    CUDA kernel this PyTorch has, for ``params`` that are all dense CUDA tensors, and fused is not already set."""
    cls = getattr(factory, "func", factory)
    if cls not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD) or "fused" in getattr(factory, "keywords", {}):
        return False
    if "fused" not in inspect.signature(cls).parameters:
        return False
    return bool(params) and all(p.is_cuda and not p.is_sparse for p in params)



LR_SCALINGS = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, batch: int, reference: int, scaling: str) -> tuple[float, float]:
    """``(lr, scale)``: the learning rate for an effective ``batch`` from the one given for ``reference`` images,
    scaled linearly (Goyal et al. 2017), by the square root (LAMB, DINOv2) or not at all."""
    ratio = batch / reference
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[scaling]
    return base_lr * scale, scale


def build_optimizer(factory: Callable, groups: list[dict], lr: float, weight_decay_end: float | None,
                    allow_fused: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer (``factory``: a partial with its ``lr`` and ``weight_decay``) over ``groups`` at ``lr``.
    A group's ``lr_ratio`` sets its lr relative to ``lr`` (Barlow Twins' biases); with ``weight_decay_end``, groups
    without a weight decay of their own are marked to follow the cosine weight-decay schedule (``wd_schedule``,
    ``wd_start``). Built fused where :func:`fusable` and ``allow_fused`` say so."""
    wd = factory.keywords.get("weight_decay", 0.0)
    for group in groups:
        if "weight_decay" not in group and weight_decay_end is not None:
            group.update(wd_schedule=True, wd_start=wd)
        if "lr_ratio" in group:
            group["lr"] = lr * group.pop("lr_ratio")
    fused = allow_fused and fusable(factory, [p for g in groups for p in g["params"]])
    return factory(groups, lr=lr, **({"fused": True} if fused else {}))


def step_weight_decay(optimizer: torch.optim.Optimizer, step: int, total: int, end: float) -> None:
    """The cosine weight-decay schedule (DINO) at ``step`` of ``total``: each group marked ``wd_schedule`` by
    :func:`build_optimizer` goes from its ``wd_start`` to ``end``."""
    from src.nn.schedules import cosine_schedule

    for group in optimizer.param_groups:
        if group.get("wd_schedule"):
            group["weight_decay"] = cosine_schedule(step, total, group["wd_start"], end)


def schedule_lambdas(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float) -> list[Callable]:
    """Per-group lr factors of a step: linear warm-up then cosine to ``min_ratio`` (:func:`warmup_cosine`), constant
    for groups marked ``fixed_lr`` (SimSiam's predictor)."""
    from src.nn.schedules import warmup_cosine

    return [(lambda s: 1.0) if g.get("fixed_lr") else (lambda s: warmup_cosine(s, total, warmup, min_ratio))
            for g in optimizer.param_groups]


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose per-tensor step is scaled by the trust ratio
    ``eta * ||w|| / ||g + weight_decay * w||`` (the form SimCLR and BYOL use). Parameter groups
    with ``lars_exclude=True`` (biases and norms, set by the method's param groups) skip both weight decay and adaptation.
    ``clip=True`` caps the adapted rate at the group's rate: the scale becomes min(trust / lr, 1) (apex's LARC
    with clip, as solo-learn's CIFAR recipes use it with eta 0.02).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3,
                 nesterov: bool = False, clip: bool = False):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      nesterov=nesterov, clip=clip, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    if group["clip"]:
                        trust = torch.clamp(trust / group["lr"], max=1.0)
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                buf = state["momentum_buffer"]
                p.add_(g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf, alpha=-group["lr"])
        return loss
