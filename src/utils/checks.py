"""Config checks that run before any compute: every problem as one line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.utils.errors import UserError

POSITIVE_KEYS = ("lr", "temperature", "batch_size", "eval_batch_size", "max_epochs", "image_size", "crop_size",
                 "proj_dim", "proj_hidden_dim", "size")


def walk_leaves(node, prefix: str = ""):
    """Yield (dotted key, value) for every leaf of a config, without resolving the hydra: node."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, DictConfig | ListConfig):
            yield from walk_leaves(v, key)
        else:
            yield key, v


def config_problems(cfg: DictConfig) -> list[str]:
    """All problems found in a composed config (empty when it is fine)."""
    problems: list[str] = []
    for top in ("method", "data", "views", "trainer", "backbone"):
        for key, _ in walk_leaves(cfg[top], top):
            if key.rsplit(".", 1)[-1] not in POSITIVE_KEYS:
                continue
            try:
                value = OmegaConf.select(cfg, key)
            except Exception:  # noqa: BLE001 - unresolvable values are reported when instantiating
                continue
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                problems.append(f"{key}={value} must be a positive number")
    if problems:
        return problems

    data = cfg.data
    for i, group in enumerate(cfg.views.get("crops", [])):
        size = group.get("size")
        if size is not None and size > data.image_size:
            problems.append(f"views.crops[{i}].size={size} is larger than data.image_size={data.image_size}: "
                            f"a crop cannot be larger than the image; use at most {data.image_size}")
        if size is not None and group.get("num", 1) < 1:
            problems.append(f"views.crops[{i}].num={group.get('num')} must be >= 1")
        first = cfg.views.crops[0].get("size")
        if i > 0 and size is not None and first is not None and size > first:
            problems.append(f"views.crops[{i}].size={size} is larger than views.crops[0].size={first}: the global "
                            "crops (the largest) come first in a multi-crop recipe; reorder the groups")

    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(str(ckpt)).is_file():
        problems.append(f"ckpt_path={ckpt} is not a file; pass the path of a checkpoint such as "
                        "outputs/<run>/checkpoints/last.ckpt")

    t = cfg.trainer
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(f"trainer.accelerator={t.accelerator} needs a CUDA GPU but none is visible; "
                        "use hardware=cpu (or hardware=ddp_cpu)")
    devices = t.devices if isinstance(t.devices, int) and t.devices > 0 else max(torch.cuda.device_count(), 1)
    world = devices * t.get("num_nodes", 1)

    try:
        method_cls = get_class(cfg.method._target_)
    except Exception:  # noqa: BLE001
        return problems + [f"method._target_={cfg.method._target_} cannot be imported; check the method yaml"]
    if hasattr(method_cls, "config_problems"):
        problems += method_cls.config_problems(cfg, global_batch=data.batch_size * world,
                                               num_views=sum(g.get("num", 1) for g in cfg.views.get("crops", [])))
    return problems


def check_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise UserError("\n".join(problems))
