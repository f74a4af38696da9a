"""Scale-out: Optuna searches and the submitit launcher as real sweeps through the CLI, the trials report, W&B
groups, SLURM launcher configs and checks, requeued sweep jobs, FSDP's wrapping. (2-node DDP: test_multinode.py;
the SLURM requeue signal path: test_resume.py.)"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.config.command_line import preflight
from src.config.compose import compose
from src.utils import loggers as loggers_module
from src.utils.sweeps import collect_trials, log_trials_to_wandb, shared_overrides, trials_markdown
from tests.helpers import run_cli, tiny_cfg

TINY_RUN = ["data=digits", "data.batch_size=64", "backbone.width=8", "trainer.max_epochs=1", "eval=final_only",
            "eval.final.linear_epochs=5", "eval.final.random_baseline=false"]


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        preflight(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_them(tmp_path):
    sweep = tmp_path / "search"
    proc = run_cli("hparams_search=contrastive", "method=simclr", *TINY_RUN, "hydra.sweeper.n_trials=2",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "results.json").is_file())
    assert len(jobs) == 2
    values = [json.loads((j / "results.json").read_text())["val_knn_top1"] for j in jobs]  # held-out train images
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(values) and set(best["best_params"]) == {
        "method.temperature", "method.optimizer.lr", "views.crops.0.scale.0"}
    sampled = [OmegaConf.load(j / ".hydra" / "config.yaml").method.temperature for j in jobs]
    assert len(set(sampled)) == 2 and all(0.05 <= t <= 1.0 for t in sampled)  # the search space was applied
    assert "trials of" in proc.stdout and (sweep / "trials.md").is_file() and (sweep / "trials.csv").is_file()


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep_as_subprocesses(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=0,1", *TINY_RUN,
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [r["seed"] for r in results] == [0, 1]
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2  # each job ran in its own submitit process
    table = (sweep / "trials.md").read_text()
    assert "| seed=0 |" in table and "| seed=1 |" in table


def test_trials_report_lists_finished_and_failed_jobs_best_first(tmp_path):
    for job, seed, knn in (("0_a", 0, 70.0), ("1_a", 1, 75.5), ("2_a", 2, None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- data=digits\n- seed={seed}\n")
        if knn is not None:
            (tmp_path / job / "results.json").write_text(json.dumps({"knn_top1": knn, "linear_top1": 80.0}))
    trials = collect_trials(tmp_path, "knn_top1")
    assert [t["job"] for t in trials] == ["1_a", "0_a", "2_a"] and trials[2]["status"] == "failed or unfinished"
    assert shared_overrides(trials) == ["data=digits"]
    table = trials_markdown(trials, "knn_top1")
    assert "| 1_a | seed=1 | 75.50 | 80.00 |" in table and "zeroshot" not in table  # columns no trial has: left out


def test_sweep_jobs_log_to_one_wandb_group_and_the_trials_table_too(tmp_path, monkeypatch):
    cfg = compose(["logger=wandb"])
    seen = {}
    monkeypatch.setattr(loggers_module, "_wandb", lambda lg_cfg, run_dir, name: seen.update(group=lg_cfg.group, name=name))
    loggers_module.build_loggers(cfg.logger, tmp_path, "method.temperature=0.2", group="2026-11-29_10-00-00")
    assert seen == {"group": "2026-11-29_10-00-00", "name": "method.temperature=0.2"}
    loggers_module.build_loggers(compose(["logger=wandb", "logger.wandb.group=mine"]).logger, tmp_path, "x", group="s")
    assert seen["group"] == "mine"  # a group the user names wins

    import wandb

    class FakeRun:
        summary: dict = {}

        def log(self, data):
            seen["table"] = data["trials"]

        def finish(self):
            seen["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(init=kw) or FakeRun())
    trials = [{"job": "0_a", "overrides": "seed=0", "objective": 70.0, "val_knn_top1": 70.0, "knn_top1": 69.0,
               "linear_top1": None, "zeroshot_top1": None, "wall_time_s": 1.0, "status": "done"}]
    log_trials_to_wandb(trials, compose(["logger=wandb", "logger.wandb.mode=offline"]), tmp_path / "2026-sweep")
    assert seen["init"]["group"] == "2026-sweep" and seen["init"]["job_type"] == "sweep-summary"
    assert seen["table"].data == [["0_a", "seed=0", 70.0, 70.0, 69.0, None, None, 1.0, "done"]] and seen["finished"]


def test_missing_sweeper_or_launcher_extra_is_one_line(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("hydra_plugins") else real(name, *a))
    assert "pip install -e '.[sweep]'" in one_line_error(capsys, ["hparams_search=contrastive"])
    assert "pip install -e '.[slurm]'" in one_line_error(capsys, ["-m", "hydra/launcher=slurm"])


def test_search_space_keys_and_objective_are_checked_before_the_sweep(capsys):
    assert "hparams_search=contrastive samples method.temperature, which method=byol does not have" in \
        one_line_error(capsys, ["hparams_search=contrastive", "method=byol"])
    assert "only method=clip produces" in one_line_error(capsys, ["objective=zeroshot_top1"])
    assert "comes from eval.final, which this run turns off" in one_line_error(
        capsys, ["hparams_search=contrastive", "eval=none"])
    assert "eval.final.holdout_fraction is 0" in one_line_error(
        capsys, ["hparams_search=contrastive", "eval.final.holdout_fraction=0"])


def test_slurm_launcher_is_sized_from_the_trainer_and_checked(capsys, monkeypatch):
    cfg = compose(["hydra/launcher=slurm", "hardware=multinode", "trainer.num_nodes=4", "trainer.devices=8"],
                  return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (4, 8, 8)
    assert launcher["max_num_timeout"] > 0 and launcher["_target_"].endswith("SlurmLauncher")
    import shutil

    assert "no SLURM (no srun)" in one_line_error(capsys, ["-m", "hydra/launcher=slurm", "hardware=multinode"])
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)  # as on a login node without GPUs
    assert "give both as numbers" in one_line_error(capsys, ["-m", "hydra/launcher=slurm", "hardware=ddp"])


def test_a_requeued_sweep_job_continues_from_its_own_folder(tmp_path, capsys):
    from src.train import continue_job

    cfg = compose(["resume=auto"])
    assert continue_job(cfg, tmp_path) is None and cfg.ckpt_path is None  # a new job: nothing to continue
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert continue_job(cfg, tmp_path) is None and cfg.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "results.json").write_text(json.dumps({"val_knn_top1": 71.5}))
    assert continue_job(compose(["resume=auto"]), tmp_path) == 71.5  # finished: its result, no second run
    assert "already finished" in capsys.readouterr().out


def test_multinode_runs_need_one_shared_run_folder(capsys, monkeypatch):
    from src.config.command_line import multinode_arguments

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    argv = ["hardware=ddp_cpu", "trainer.num_nodes=2"]
    with pytest.raises(SystemExit):
        multinode_arguments(argv)
    assert "pass the same hydra.run.dir" in capsys.readouterr().err
    assert multinode_arguments([*argv, "hydra.run.dir=/shared/run"]) == [*argv, "hydra.run.dir=/shared/run"]
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert multinode_arguments(argv)[-1] == "hydra.run.dir=outputs/simclr_convnet_fashion_mnist/slurm_4242"


def test_fsdp_wraps_each_transformer_block():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    from src.train import strategy_for

    cfg = tiny_cfg("mae", "hardware=fsdp")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    strategy = strategy_for(cfg, method)
    assert isinstance(strategy, FSDPStrategy) and Block in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy_for(tiny_cfg("simclr"), method) == "auto"


def test_sweep_extras_are_importable_as_ci_installs_them():
    for module in ("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_submitit_launcher", "optuna", "submitit"):
        assert importlib.util.find_spec(module) is not None, module
    assert sys.version_info >= (3, 10)
    assert Path(__file__).parents[1].joinpath("conf", "hydra", "launcher", "slurm.yaml").is_file()
