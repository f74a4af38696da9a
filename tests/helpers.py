import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from src.utils.config import compose, group_options

ROOT = Path(__file__).resolve().parents[1]
METHODS = group_options("method")

torch.set_num_threads(2)


def tiny_cfg(method: str, *overrides: str):
    """The real configs of ``method`` shrunk to run in a second on CPU (fake data, 8-channel convnet)."""
    cfg = compose([f"method={method}", "data=fake", "backbone=convnet", "backbone.width=8", "backbone.depth=2",
                   "data.batch_size=16", "data.image_size=16", "data.crop_size=16", "logger=none", "eval=none",
                   "trainer.max_epochs=1", *overrides])
    with open_dict(cfg):
        for key in cfg.method:  # heads of 32 units (DINO's 8192-wide, 65536-way ones included)
            if key.endswith("_dim") and key not in overrides_keys(overrides):
                cfg.method[key] = 32
        if "num_prototypes" in cfg.method:
            cfg.method.num_prototypes = 16
        if cfg.method.get("queue_size"):
            cfg.method.queue_size = 64
        cfg.method.warmup_epochs = 0
        if "gap" in cfg.method and "gap" not in overrides_keys(overrides):
            cfg.method.gap, cfg.method.jitter = 1, 0  # a 3x3 grid of 4-px patches fits the 16-px crop
    return cfg


def overrides_keys(overrides) -> set[str]:
    return {o.split("=", 1)[0].removeprefix("method.") for o in overrides}


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m src.train ARGS` as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def to_plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)
