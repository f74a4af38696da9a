"""Metric loggers from the `logger` config group; W&B never takes a run down."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
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


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str, group: str | None = None) -> list:
    """The loggers of ``cfg`` writing into ``run_dir``; a W&B run is named ``run_name`` and, in a sweep, joins the
    sweep's ``group`` (unless ``logger.wandb.group`` names one)."""
    loggers = []
    for name, lg_cfg in (cfg or {}).items():
        if lg_cfg is None:
            continue
        if name == "wandb":
            if group and not lg_cfg.get("group"):
                lg_cfg = OmegaConf.merge(lg_cfg, {"group": group})
            logger = _wandb(lg_cfg, run_dir, run_name)
            if logger is not None:
                loggers.append(logger)
        else:
            loggers.append(instantiate(lg_cfg, save_dir=str(run_dir)))
    return loggers


def summarise(loggers: list, results: dict) -> None:
    """The run's numeric results as the W&B run's summary (what a sweep's runs table shows). Never raises."""
    numbers = {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                logger.experiment.summary.update(numbers)
            except Exception as e:  # noqa: BLE001 - W&B never takes a run down
                rank_zero_only(log.warning)(f"W&B summary not written ({_reason(e)})")


def wandb_mode(mode: str) -> str:
    """``auto`` -> online with credentials, else offline."""
    return ("online" if wandb_credentials() else "offline") if mode == "auto" else mode


def finish_loggers(loggers: list, ok: bool) -> None:
    """End the W&B run of this job (Lightning leaves it open, and the next job of a multirun in the same
    process would log into it). Never raises."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            try:
                import wandb

                if wandb.run is not None:
                    wandb.finish(exit_code=0 if ok else 1)
            except Exception as e:  # noqa: BLE001 - W&B never takes a run down
                rank_zero_only(log.warning)(f"W&B did not finish cleanly ({_reason(e)})")


def _wandb(cfg: DictConfig, run_dir: Path, run_name: str):
    """A started WandbLogger, or None. ``mode: auto`` is online with credentials, else offline; when going online
    fails (no network, a bad key, a server that does not answer within ``init_timeout`` seconds) the run logs
    offline into ``<run>/wandb`` instead. One warning line says what happened; the run never stops for W&B."""
    kwargs = OmegaConf.to_container(cfg, resolve=True)
    mode = wandb_mode(kwargs.pop("mode", "auto"))
    timeout = float(kwargs.pop("init_timeout", 30))
    try:
        return _start_wandb(kwargs, run_dir, run_name, mode, timeout, wandb_run_id(run_dir))
    except Exception as e:  # noqa: BLE001 - any W&B problem must not stop training
        first = _reason(e)
    warn = rank_zero_only(log.warning)
    if mode == "online":
        try:
            # a fresh id: the failed online start may still hold the run's own id in this process
            logger = _start_wandb(kwargs, run_dir, run_name, "offline", timeout, None)
            warn(f"W&B online logging failed ({first}); logging offline into {run_dir / 'wandb'} instead "
                 "(`wandb sync` uploads it later)")
            return logger
        except Exception as e:  # noqa: BLE001
            first = f"online: {first}; offline: {_reason(e)}"
    warn(f"W&B logging disabled ({first}); metrics still go to the CSV logger")
    return None


def _start_wandb(kwargs: dict, run_dir: Path, run_name: str, mode: str, timeout: float, run_id: str | None):
    import wandb

    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    logger = instantiate({**kwargs, "save_dir": str(run_dir), "name": run_name, "mode": mode, **resume,
                          "settings": wandb.Settings(init_timeout=timeout, silent=True)})
    _ = logger.experiment  # start the run now, so a failure shows here and not mid-training
    return logger


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder: made once and kept in ``<run>/.wandb_id``, so a resumed run
    (``resume=auto`` continues in the same folder) keeps logging to the same W&B run."""
    path = Path(run_dir) / ".wandb_id"
    if path.is_file() and (saved := path.read_text().strip()):
        return saved
    run_id = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def log_to_run_wandb(cfg: DictConfig, run_dir: Path, results: dict, pictures: list[tuple[str, Path]]) -> bool:
    """Add evaluation figures (under ``eval/``, to the run summary) and pictures to the W&B run of a finished run folder
    (its ``.wandb_id``), when the run logged to W&B. Returns whether it did; never raises."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    id_file = Path(run_dir) / ".wandb_id"
    if wandb_cfg is None or not id_file.is_file():
        return False
    try:
        import wandb

        mode = wandb_mode(wandb_cfg.get("mode", "auto"))
        if mode == "disabled":
            return False
        run = wandb.init(id=id_file.read_text().strip(), resume="allow", project=wandb_cfg.get("project"),
                         entity=wandb_cfg.get("entity"), dir=str(run_dir), mode=mode, reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=float(wandb_cfg.get("init_timeout", 30)), silent=True))
        numbers = {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        run.summary.update(numbers)
        images = {f"eval/{what}": wandb.Image(str(path)) for what, path in pictures if Path(path).is_file()}
        if images:
            run.log(images)
        run.finish()
        return True
    except Exception as e:  # noqa: BLE001 - W&B never takes an evaluation down
        log.warning(f"W&B: evaluation not added to the run ({_reason(e)})")
        return False


def log_wandb_table(wandb_cfg, folder: Path, name: str, job_type: str, key: str, columns: list[str], rows: list[list],
                    summary: dict | None = None, images: dict[str, Path] | None = None) -> bool:
    """A summary run ``name`` in the W&B group of ``folder`` (``logger.wandb.group``, else the folder's name: a sweep's
    group) holding ``rows`` as a ``wandb.Table`` under ``key``, plus ``summary`` values and ``images`` (files).
    Nothing without a W&B logger config; returns whether it logged; never raises."""
    if wandb_cfg is None:
        return False
    try:
        import wandb

        mode = wandb_mode(wandb_cfg.get("mode", "auto"))
        if mode == "disabled":
            return False
        run = wandb.init(project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"),
                         group=wandb_cfg.get("group") or Path(folder).name, name=name, job_type=job_type,
                         dir=str(folder), mode=mode, reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=float(wandb_cfg.get("init_timeout", 30)), silent=True))
        run.log({key: wandb.Table(columns=columns, data=rows),
                 **{k: wandb.Image(str(v)) for k, v in (images or {}).items() if Path(v).is_file()}})
        run.summary.update(summary or {})
        run.finish()
        return True
    except Exception as e:  # noqa: BLE001 - W&B never takes a sweep or a report down
        log.warning(f"W&B {key} table not logged ({_reason(e)})")
        return False
