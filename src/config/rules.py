"""Config checks that run before any compute: every problem as one line naming the key and the fix.

In order: secrets in the config, keys and value types against the code (:mod:`src.config.keys`), positive
sizes and rates, then rules between fields (crops vs image size, devices, batch vs samples, the method's own
rules). Problems of one kind are all reported at once; rules between fields run only when every value has
the right type (they would trip over a string where a number belongs).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.config.keys import schema_problems, walk_leaves
from src.utils.errors import UserError

POSITIVE_KEYS = ("lr", "temperature", "batch_size", "eval_batch_size", "max_epochs", "image_size", "crop_size",
                 "proj_dim", "proj_hidden_dim", "size")
SECRET_KEY = re.compile(r"api_?key|(^|_)tokens?($|_)|passw(or)?d|secret", re.IGNORECASE)  # token as a word: not tokenizer
SECRET_ENV = {"wandb": "WANDB_API_KEY"}
ENV_READ = re.compile(r"\$\{oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)")  # ${oc.env:NAME} or ${oc.env:NAME,default}


def secret_problems(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, line) for every key named like a credential (``*api_key*``, ``*_token*``, ``*password*``,
    ``*secret*``) that holds a string: configs are saved in .hydra/, hyperparameter logs and checkpoints.
    The value itself is never echoed."""
    problems = []
    for top in cfg.keys():
        if top == "hydra":
            continue
        node = cfg._get_node(top)
        container = isinstance(node, DictConfig | ListConfig)
        leaves = walk_leaves(node, str(top)) if container else [(str(top), node._value())]
        for key, value in leaves:
            if not isinstance(value, str) or not value:
                continue
            env_var = next((m for m in ENV_READ.findall(value) if SECRET_KEY.search(m) or m.endswith("_KEY")), None)
            if env_var:
                problems.append((key, f"{key}: reads the credential {env_var} into the config, which is saved in "
                                      "logs and checkpoints; remove it (tools read their environment variables "
                                      "themselves)"))
                continue
            if not SECRET_KEY.search(key.rsplit(".", 1)[-1]):
                continue
            env = next((v for k, v in SECRET_ENV.items() if k in key), None)
            where = f"the environment variable {env}" if env else "an environment variable read by the tool"
            problems.append((key, f"{key}: looks like a secret; credentials must not be in the config (it is saved "
                                  f"in .hydra/, logs and checkpoints); remove it and set {where} instead"))
    return problems


def _select(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - unresolvable values are reported when instantiating
        return None


def positive_problems(cfg: DictConfig, skip: set[str]) -> list[str]:
    problems = []
    for top in ("method", "data", "views", "trainer", "backbone"):
        if not isinstance(cfg.get(top), DictConfig):
            continue
        for key, _ in walk_leaves(cfg[top], top):
            if key.rsplit(".", 1)[-1] not in POSITIVE_KEYS or key in skip:
                continue
            value = _select(cfg, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
                problems.append(f"{key}={value} must be a positive number")
    timeout = _select(cfg, "logger.wandb.init_timeout")
    if "logger.wandb.init_timeout" not in skip and isinstance(timeout, int | float) and timeout <= 0:
        problems.append(f"logger.wandb.init_timeout={timeout} must be a positive number of seconds")
    return problems


def view_counts(cfg: DictConfig) -> list[int]:
    """Views per crop group as the views will make them (``views.local_crops`` applied to the local group)."""
    from src.data.views import with_local_crops

    groups = [{"size": g.get("size"), "num": g.get("num", 1)} for g in cfg.views.get("crops", [])]
    try:
        groups = with_local_crops(groups, cfg.views.get("local_crops"))
    except ValueError:  # reported by view_problems
        pass
    return [g["num"] for g in groups]


def view_problems(cfg: DictConfig, crop_size_reported: bool, reported: set[str]) -> list[str]:
    from src.data.views import parse_crop_group, with_local_crops

    problems = []
    data, crops = cfg.data, cfg.views.get("crops", [])
    first = crops[0].get("size") if crops else None
    for i, group in enumerate(crops):
        size = group.get("size")
        if size is not None and size > data.image_size and not (crop_size_reported and size == data.crop_size):
            problems.append(f"views.crops[{i}].size={size} is larger than data.image_size={data.image_size}: "
                            f"a crop cannot be larger than the image; use at most {data.image_size}")
        if i > 0 and size is not None and first is not None and size > first:
            problems.append(f"views.crops[{i}].size={size} is larger than views.crops[0].size={first}: the global "
                            "crops (the largest) come first in a multi-crop recipe; reorder the groups")
        if any(k.startswith(f"views.crops.{i}.") for k in reported):
            continue  # an unknown key in this group is reported already
        try:
            parse_crop_group(i, OmegaConf.to_container(group, resolve=True))
        except ValueError as e:  # ranges: probabilities in [0, 1], num >= 1, ordered [min, max] pairs ...
            problems.append(str(e))
    if cfg.views.get("local_crops") is not None and not problems:
        try:
            with_local_crops([{"size": g.get("size"), "num": g.get("num", 1)} for g in crops], cfg.views.local_crops)
        except ValueError as e:  # not an integer >= 0, or views without (or with several) local groups
            problems.append(str(e))
    return problems


def world_size(cfg: DictConfig) -> int:
    t = cfg.trainer
    devices = t.get("devices", 1)
    if isinstance(devices, ListConfig | list):
        devices = len(devices)
    elif not isinstance(devices, int) or isinstance(devices, bool) or devices <= 0:
        devices = max(torch.cuda.device_count(), 1) if t.get("accelerator") in ("gpu", "cuda", "auto") else 1
    return devices * (t.get("num_nodes", 1) or 1)


def device_problems(cfg: DictConfig) -> list[str]:
    t, problems = cfg.trainer, []
    accelerator, devices = t.get("accelerator"), t.get("devices")
    gpu = accelerator in ("gpu", "cuda")
    if gpu and not torch.cuda.is_available():
        return [f"trainer.accelerator={accelerator} needs a CUDA GPU but none is visible; "
                "use hardware=cpu (or hardware=ddp_cpu)"]
    if isinstance(devices, int) and not isinstance(devices, bool) and (devices == 0 or devices < -1):
        problems.append(f"trainer.devices={devices}: use a positive count, -1 (all) or a list of device indices")
    elif gpu:
        visible = torch.cuda.device_count()
        wanted = list(devices) if isinstance(devices, ListConfig | list) else None
        if isinstance(devices, int) and devices > visible:
            problems.append(f"trainer.devices={devices} but {visible} GPU(s) are visible "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                            f"use trainer.devices={visible} or -1 for all")
        elif wanted is not None and any(not isinstance(d, int) or d < 0 or d >= visible for d in wanted):
            problems.append(f"trainer.devices={wanted} names a GPU index outside 0..{visible - 1} "
                            f"({visible} GPU(s) visible)")
    return problems


def data_problems(cfg: DictConfig, world: int) -> list[str]:
    data, problems = cfg.data, []
    image, crop = data.get("image_size"), data.get("crop_size")
    if image is not None and crop is not None and crop > image:
        problems.append(f"data.crop_size={crop} is larger than data.image_size={image}: the random crops are cut "
                        f"from the stored image; use data.crop_size<={image} or raise data.image_size")
    channels = data.get("channels")
    wrong = [k for k in ("mean", "std") if data.get(k) is not None and channels is not None
             and len(data.get(k)) != channels]
    if wrong:
        shown = " and ".join(f"data.{k}={list(data.get(k))}" for k in wrong)
        problems.append(f"{shown}: need one entry per channel but data.channels={channels}")
    samples, batch = data.get("max_train_samples"), data.get("batch_size")
    if samples is not None and batch is not None and samples < batch * world:
        problems.append(f"data.max_train_samples={samples} is smaller than the global batch {batch * world} "
                        f"(data.batch_size={batch} x {world} device(s)); use null (all images) or at least "
                        f"{batch * world}")
    return problems


# results.json values a sweep can optimise, and the eval entry that produces each
IMAGE_TEXT_OBJECTIVES = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
OBJECTIVES = {
    **{k: "final" for k in ("val_knn_top1", "val_linear_top1", "knn_top1", "linear_top1", "linear_top5",
                            *IMAGE_TEXT_OBJECTIVES)},
    "last_knn_top1": "knn", "last_online_val_top1": "online_probe",
}


def objective_problems(cfg: DictConfig, searching: bool = False) -> list[str]:
    """The value a run returns to sweepers must be a result name, an image–text one only for CLIP; in a search
    (``searching``) the evaluation that produces it must be on, and ``val_*`` needs ``eval.final.holdout_fraction``."""
    objective = cfg.get("objective", "knn_top1")
    if objective not in OBJECTIVES:
        return [f"objective={objective} is not a result a run produces; use one of {', '.join(OBJECTIVES)}"]
    entry = OBJECTIVES[objective]
    if objective in IMAGE_TEXT_OBJECTIVES and not getattr(_method_class(cfg), "needs_captions", False):
        return [f"objective={objective} is an image–text result, which only method=clip produces; use val_knn_top1 "
                "or val_linear_top1"]
    if not searching:
        return []
    node = (cfg.get("eval") or {}).get(entry)
    if node is None:
        return [f"objective={objective} comes from eval.{entry}, which this run turns off; choose another objective "
                f"or keep eval.{entry}"]
    if objective.startswith("val_") and not node.get("holdout_fraction"):
        return [f"objective={objective} is measured on held-out training data, but eval.final.holdout_fraction is 0; "
                "set it (e.g. 0.1)"]
    return []


def protocol_problems(cfg: DictConfig) -> list[str]:
    """``eval.final.protocols`` must name protocols the config has settings for (``protocols.<name>``)."""
    names = ((cfg.get("eval") or {}).get("final") or {}).get("protocols") or []
    known = sorted((cfg.get("protocols") or {}).keys())
    return [f"eval.final.protocols: {name!r} is not a protocol; allowed: {', '.join(known)}"
            for name in names if name not in known]


def _method_class(cfg: DictConfig):
    try:
        return get_class(cfg.method._target_)
    except Exception:  # noqa: BLE001 - reported elsewhere
        return None


def config_problems(cfg: DictConfig, local_devices: bool = True) -> list[str]:
    """All problems found in a composed config (empty when it is fine). ``local_devices=False``: the run goes to
    other machines (hydra/launcher=slurm), so this one's GPUs are not checked."""
    secrets = secret_problems(cfg)
    reported = {key for key, _ in secrets}
    problems = [line for _, line in secrets]
    blocking = False
    for p in schema_problems(cfg):
        if p.key not in reported:
            reported.add(p.key)
            problems.append(p.text)
            blocking = blocking or p.kind == "type"
    positive = positive_problems(cfg, reported)
    problems += positive
    if blocking or positive:
        return problems

    crop_reported = len(problems)
    problems += data_problems(cfg, world_size(cfg))
    crop_reported = any(p.startswith("data.crop_size=") for p in problems[crop_reported:])
    problems += view_problems(cfg, crop_reported, reported)

    ckpt = cfg.get("ckpt_path")
    if ckpt and not Path(str(ckpt)).is_file():
        problems.append(f"ckpt_path={ckpt} is not a file; pass the path of a checkpoint such as "
                        "outputs/<run>/checkpoints/last.ckpt")
    problems += device_problems(cfg) if local_devices else []
    if cfg.trainer.get("strategy") == "fsdp" and cfg.trainer.get("accelerator") not in ("gpu", "cuda"):
        problems.append(f"trainer.strategy=fsdp runs on GPUs only (Lightning's FSDP) but trainer.accelerator="
                        f"{cfg.trainer.get('accelerator')}; use hardware=fsdp on GPUs, or trainer.strategy=ddp here")
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate is not None and accumulate < 1:
        problems.append(f"trainer.accumulate_grad_batches={accumulate} must be >= 1 (1: no accumulation)")
    every = (cfg.get("checkpoint") or {}).get("every_n_epochs", 1)
    if every is not None and every < 1:
        problems.append(f"checkpoint.every_n_epochs={every} must be >= 1 (last.ckpt is written every N epochs)")
    problems += objective_problems(cfg) + protocol_problems(cfg)

    if "backbone._target_" not in reported:  # the backbone's own rules (ViT patch sizes, timm names, weights files)
        try:
            backbone_cls = get_class(cfg.backbone._target_)
        except Exception:  # noqa: BLE001 - reported by the schema check
            backbone_cls = None
        if hasattr(backbone_cls, "config_problems"):
            problems += backbone_cls.config_problems(cfg)
    if "method._target_" in reported:
        return problems  # the schema check already said it cannot be imported
    try:
        method_cls = get_class(cfg.method._target_)
    except Exception:  # noqa: BLE001
        return problems + [f"method._target_={cfg.method._target_} cannot be imported; check the method yaml"]
    if hasattr(method_cls, "config_problems"):
        global_batch = cfg.data.batch_size * world_size(cfg)
        num_views = sum(view_counts(cfg))
        problems += method_problems(method_cls, cfg, global_batch, num_views)
        problems += method_cls.config_problems(cfg, global_batch=global_batch, num_views=num_views)
    return problems


def method_problems(method_cls, cfg: DictConfig, global_batch: int, num_views: int) -> list[str]:
    """The rules every method shares: a global batch its loss can use, as many views as it compares, a known lr
    scaling (the method's own rules are its ``config_problems``)."""
    from src.nn.optim import LR_SCALINGS

    problems, name = [], method_cls.__name__
    if global_batch < method_cls.min_global_batch:
        problems.append(f"data.batch_size gives a global batch of {global_batch}, too small for {name}'s loss (needs "
                        f">= {method_cls.min_global_batch}); raise data.batch_size")
    if num_views < method_cls.min_views:
        problems.append(f"{name} needs {method_cls.min_views} views per image but views give {num_views}; set "
                        f"views.crops[0].num={method_cls.min_views}")
    if (scaling := cfg.method.get("lr_scaling", "linear")) not in LR_SCALINGS:
        problems.append(f"method.lr_scaling={scaling} is not allowed; use {', '.join(LR_SCALINGS)}")
    return problems


def check_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise UserError("\n".join(problems))
