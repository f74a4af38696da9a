"""Metric loggers from the `logger` config group; W&B never takes a run down."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_credentials() -> bool:
    """True when W&B could log online: an API key in the environment or a `wandb login` in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str) -> list:
    loggers = []
    for name, lg_cfg in (cfg or {}).items():
        if lg_cfg is None:
            continue
        if name == "wandb":
            logger = _wandb(lg_cfg, run_dir, run_name)
            if logger is not None:
                loggers.append(logger)
        else:
            loggers.append(instantiate(lg_cfg, save_dir=str(run_dir)))
    return loggers


def _wandb(cfg: DictConfig, run_dir: Path, run_name: str):
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    mode = kwargs.pop("mode", "auto")
    if mode == "auto":
        mode = "online" if wandb_credentials() else "offline"
    try:
        import wandb

        logger = instantiate({**kwargs, "save_dir": str(run_dir), "name": run_name, "mode": mode,
                              "settings": wandb.Settings(init_timeout=60, silent=True)})
        _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
        return logger
    except Exception as e:  # noqa: BLE001 - any W&B problem must not stop training
        rank_zero_only(log.warning)(f"W&B logging disabled ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       "metrics still go to the CSV logger")
        return None
