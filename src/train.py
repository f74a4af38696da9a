"""`python -m src.train [overrides]`: compose -> check -> instantiate -> fit -> final evaluation -> table.

Every problem a user can fix (bad config, missing data, non-finite loss) ends as one `error:` line on
stderr with exit code 2; a run folder that got nothing but its config is removed again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException, MissingConfigException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from src.callbacks.data_health import DataHealth
from src.callbacks.final_eval import FinalEvaluation
from src.callbacks.resume import DataPosition, LastCheckpoint, Preemption, TrainingStarted, finish_evaluations
from src.callbacks.throughput import ThroughputMonitor
from src.config.command_line import launch_arguments, preflight
from src.config.compose import CONF_DIR, fitted
from src.config.rules import check_config
from src.utils.checkpointing import AtomicCheckpointIO, build_method, finished, resume_problem
from src.utils.errors import RunInterrupted, UserError, fail
from src.utils.loggers import build_loggers, finish_loggers, summarise
from src.utils.results import format_table, write_results

# Lightning notices that are expected here and say nothing to a user of this framework.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")  # DataPosition resumes it
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # BEiT's frozen tokenizer


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = [ThroughputMonitor()]  # first: its timing must not include the probes
    for name, cb_cfg in (cfg.eval or {}).items():
        if name == "final":  # a fresh method of the run's architecture is its random-init baseline
            cb = FinalEvaluation.from_config(cfg, random_model=lambda: build_method(cfg, fresh=True))
        else:
            cb = instantiate(cb_cfg) if cb_cfg is not None else None
        callbacks += [cb] if cb is not None else []
    callbacks.append(DataHealth())  # after the evaluation: it also counts files skipped while evaluating
    callbacks.append(TrainingStarted())
    last = run_dir / "checkpoints" / "last.ckpt"
    callbacks += [DataPosition(), Preemption(last), LastCheckpoint(last, cfg.checkpoint.every_n_epochs)]
    return callbacks


# Transformer and residual blocks: the units hardware=fsdp shards (timm's ViT, open_clip's text tower, ResNets)
FSDP_UNITS = {"Block", "ResidualAttentionBlock", "Bottleneck", "BasicBlock"}


def strategy_for(cfg: DictConfig, method: L.LightningModule):
    """``trainer.strategy`` as configured, except ``fsdp``: Lightning's FSDPStrategy with each block of the model
    (:data:`FSDP_UNITS`) as one unit, fully sharded, original parameters kept (so the optimizer's weight-decay
    groups and the EMA teachers see them) and full state dicts in checkpoints."""
    strategy = cfg.trainer.get("strategy", "auto")
    if strategy != "fsdp":
        return strategy
    from lightning.pytorch.strategies import FSDPStrategy

    units = {type(m) for m in method.modules() if type(m).__name__ in FSDP_UNITS}
    return FSDPStrategy(auto_wrap_policy=units or None, sharding_strategy="FULL_SHARD", state_dict_type="full",
                        use_orig_params=True)


def build_parts(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The run's datamodule and method (backbone and views injected), after seeding every RNG with the run seed."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    return datamodule, build_method(cfg, nonfinite_loss=cfg.nonfinite_loss)


def build_trainer(cfg: DictConfig, method: L.LightningModule, callbacks: list[L.Callback], loggers: list,
                  run_dir: Path) -> L.Trainer:
    """The run's Trainer: checkpoints written atomically; the data order comes from (seed, epoch) and each rank takes
    its own slice of it (src/data/sampler.py), so Lightning's sampler replacement is off."""
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # submitit requeues (src/callbacks/resume.py), not Lightning as well
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), "strategy": strategy_for(cfg, method)}
    return L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False, default_root_dir=run_dir,
                     plugins=plugins, use_distributed_sampler=False)


def train(cfg: DictConfig, run_dir: Path, names: dict[str, str], sweep: tuple[str, str] | None = None) -> dict:
    """One run; ``sweep`` = (the sweep's W&B group, this job's name) when it is a job of a multirun."""
    check_config(cfg)
    start = time.time()
    datamodule, method = build_parts(cfg)
    if cfg.ckpt_path and (problem := resume_problem(method, cfg.ckpt_path)):
        raise UserError(problem)
    method.run_config = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("backbone", "views", "method", "data")}
    callbacks = build_callbacks(cfg, run_dir)
    group, job = sweep or (None, None)
    loggers = build_loggers(cfg.logger, run_dir, job or "_".join(str(v) for v in names.values()), group)
    trainer = build_trainer(cfg, method, callbacks, loggers, run_dir)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if not next(cb for cb in callbacks if isinstance(cb, TrainingStarted)).started:
            finish_evaluations(trainer, method, callbacks)
    except BaseException:
        finish_loggers(loggers, ok=False)
        raise

    results = {**names, "epochs": trainer.current_epoch, "seed": cfg.seed,
               "precision": str(cfg.trainer.precision), "devices": trainer.world_size,
               "effective_batch_size": method.effective_batch_size(), "lr": getattr(method, "scaled_lr", None)}
    for cb in callbacks:
        results.update(getattr(cb, "results", {}) or {})
        metrics = getattr(cb, "metrics", {}) or {}
        results.update({k.replace("eval/", "last_"): v for k, v in metrics.items()})  # per-epoch monitors
    if method.skipped_steps:
        results["skipped_steps"] = method.skipped_steps
    if "train/pretext_acc_epoch" in trainer.callback_metrics:  # rotation, patch location, jigsaw: last epoch's mean
        results["pretext_acc"] = round(100 * float(trainer.callback_metrics["train/pretext_acc_epoch"]), 2)
    results["wall_time_s"] = round(time.time() - start, 1)
    results["run_dir"] = str(run_dir)
    results = {k: (round(float(v), 4) if isinstance(v, torch.Tensor | float) else v) for k, v in results.items()}
    summarise(loggers, results)
    if trainer.is_global_zero:
        write_results(results, run_dir)
        print("\n" + format_table(results) + f"\n\nresults: {run_dir / 'results.json'}", flush=True)
    finish_loggers(loggers, ok=True)
    return results


def _discard_if_empty(run_dir: Path) -> None:
    """Remove a run folder that holds nothing a user could want (config copy and empty logs only)."""
    if not run_dir.is_dir():
        return
    if any(p.is_file() and p.suffix in {".ckpt", ".json", ".csv"} for p in run_dir.rglob("*")):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    try:  # and its outputs/<method>_<backbone>_<data>/ parent when nothing else is in it
        run_dir.parent.rmdir()
    except OSError:
        pass


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    names = {k: hc.runtime.choices.get(k) for k in ("method", "backbone", "data")}
    for line in fitted(cfg, hc.runtime.choices) if rank_zero_only.rank == 0 else []:  # "CPU-sized (...): ..."
        print(line, flush=True)
    sweep = None
    if hc.mode == RunMode.MULTIRUN:  # W&B: one group per sweep, each job named after its overrides
        sweep = (Path(hc.sweep.dir).name, hc.job.override_dirname or f"job {hc.job.num}")
        if cfg.get("resume") == "auto" and (done := continue_job(cfg, run_dir)) is not None:
            return done
    try:
        results = train(cfg, run_dir, names, sweep)
    except (UserError, InstantiationException) as e:
        if not isinstance(e, UserError) and not isinstance(e.__cause__, UserError):
            raise
        _discard_if_empty(run_dir)
        fail(str(e if isinstance(e, UserError) else e.__cause__).splitlines())
    except (RunInterrupted, SIGTERMException) as e:
        signum = getattr(e, "signum", 15)
        message = str(e) or f"stopped by SIGTERM; checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}"
        if rank_zero_only.rank == 0:  # one line, not one per process
            print(f"interrupted: {message}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    value = results.get(cfg.objective)  # the value sweepers optimise (checked before the run to be one it makes)
    return float(value) if isinstance(value, int | float) else None


def continue_job(cfg: DictConfig, run_dir: Path) -> float | None:
    """``resume=auto`` in a sweep: a job whose folder already holds ``last.ckpt`` (a requeued SLURM job) continues
    from it (``cfg.ckpt_path`` is set); one that already finished returns its objective without running again."""
    ckpt, results = run_dir / "checkpoints" / "last.ckpt", run_dir / "results.json"
    if not ckpt.is_file() or cfg.get("ckpt_path"):
        return None
    if finished(run_dir):
        print(f"resume=auto: {run_dir} already finished; its results are in {results}", flush=True)
        value = json.loads(results.read_text()).get(cfg.objective)
        return float(value) if isinstance(value, int | float) else None
    print(f"resume=auto: continuing {run_dir} from {ckpt}", flush=True)
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt)
    return None


def main() -> None:
    preflight(sys.argv[1:])
    sys.argv = [sys.argv[0], *launch_arguments(sys.argv[1:])]
    try:
        hydra_entry()
    except (ValueError, MissingConfigException) as e:  # Hydra refusing its flags (a run's own errors stop in Hydra)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        fail([" ".join(str(e).split())])


if __name__ == "__main__":
    main()
