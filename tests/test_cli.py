"""The CLI as a user runs it: `python -m src.train ...` in a subprocess."""

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli

TINY = ["data=digits", "backbone.width=8", "trainer.max_epochs=2", "data.batch_size=128",
        "eval.final.linear_epochs=20", "method.warmup_epochs=0"]

pytestmark = pytest.mark.slow


def test_tiny_run_writes_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "eval.knn.every_n_epochs=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("method", "backbone", "data", "epochs", "knn_top1", "linear_top1", "random_knn_top1",
                "random_linear_top1", "wall_time_s", "train_images_per_s", "peak_memory_mib"):
        assert key in results, key
    assert (results["method"], results["backbone"], results["data"], results["epochs"]) == ("simclr", "convnet", "digits", 2)
    for key in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1"):
        assert 20.0 < results[key] <= 100.0, (key, results[key])  # 10 classes: chance is 10%
    assert results["train_images_per_s"] > 0 and results["peak_memory_mib"] > 0
    assert "kNN top-1 (%)" in proc.stdout and "results.json" in proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = (run_dir / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "eval/knn_top1" in metrics and "eval/online_val_top1" in metrics


def test_multirun_writes_one_result_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=simclr,moco_v2", *TINY, "trainer.max_epochs=1",
                   "eval=final_only", "eval.final.random_baseline=false", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2, list(sweep.rglob("*"))
    assert {json.loads(p.read_text())["method"] for p in results} == {"simclr", "moco_v2"}


BAD_INPUTS = {
    "unknown method": (["method=mocoo"], "unknown method 'mocoo'; available: barlow_twins, byol, dino, moco, moco_v1"),
    "unknown backbone": (["backbone=resnet7"], "unknown backbone 'resnet7'"),
    "unknown dataset": (["data=mnist2"], "unknown data 'mnist2'"),
    "missing dataset root": (["method=moco", "data=imagenet"], "data.root is not set"),
    "dataset root does not exist": (["data=imagefolder", "data.root=/nonexistent/images"], "does not exist"),
    "non-positive lr": (["method.optimizer.lr=-0.1"], "method.optimizer.lr=-0.1 must be a positive number"),
    "zero temperature": (["method.temperature=0"], "method.temperature=0 must be a positive number"),
    "non-positive batch size": (["data.batch_size=0"], "data.batch_size=0 must be a positive number"),
    "batch too small for the loss": (["data.batch_size=1"], "too small for SimCLR's loss"),
    "view larger than the image": (["views.crops.0.size=64"], "views.crops[0].size=64 is larger than data.image_size=28"),
    "queue not a multiple of the batch": (["method=moco", "method.queue_size=1000"], "multiple of the global batch 256"),
    "swav queue not a multiple of the batch": (["method=swav", "method.queue_size=1000"],
                                               "method.queue_size=1000 must be a multiple of the global batch 256"),
    "local crops larger than the global ones": (["views=multicrop", "views.crops.0.size=10"],
                                                "views.crops[1].size=12 is larger than views.crops[0].size=10"),
    "typo in a key": (["method.temprature=0.1"], "unknown config key 'method.temprature'; did you mean 'method.temperature'?"),
    "gpu without a gpu": (["hardware=gpu"], "needs a CUDA GPU but none is visible"),
    "missing checkpoint to resume": (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt is not a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clear_line(case, tmp_path):
    args, expected = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    proc = run_cli(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists(), "nothing may be written for a run that cannot start"


def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "method=simclr,mocoo", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2 and "unknown method 'mocoo'" in proc.stderr
    assert not Path(sweep).exists()


def _no_credentials_env(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path / "wandb_home"), "PYTHONWARNINGS": "ignore"}


def _run_env(args, env, cwd):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "src.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_wandb_without_credentials_logs_offline(tmp_path):
    from tests.helpers import ROOT

    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=1", "eval=final_only", "logger=wandb", f"hydra.run.dir={run_dir}"]
    proc = _run_env(args, _no_credentials_env(tmp_path), ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*")), list(run_dir.rglob("*"))[:20]
    assert (run_dir / "csv" / "metrics.csv").is_file() and (run_dir / "results.json").is_file()


def test_wandb_failure_never_takes_the_run_down(tmp_path):
    from tests.helpers import ROOT

    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=1", "eval=final_only", "logger=wandb", "logger.wandb.mode=online",
            f"hydra.run.dir={run_dir}"]
    proc = _run_env(args, _no_credentials_env(tmp_path), ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B logging disabled" in proc.stderr + proc.stdout
    assert (run_dir / "results.json").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def test_ddp_cpu_run_writes_one_result(tmp_path):
    """hardware=ddp_cpu: Lightning re-launches the script for rank 1 into the same run folder."""
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "trainer.max_epochs=1", "hardware=ddp_cpu", "data.batch_size=64", "eval=final_only",
                   "eval.final.random_baseline=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["devices"] == 2 and results["effective_batch_size"] == 128
    assert results["knn_top1"] > 20.0
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "rank 1 must not create a second run folder"


def test_imagefolder_run_reads_a_class_per_folder_tree(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("val", 16)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))  # varied sizes and modes
                arr = np.clip(rng.normal(colour, 30, size=(*size[::-1], 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(arr)
                (img.convert("L") if i % 5 == 0 else img).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "class0" / "broken.png").write_bytes(b"not an image")
    run_dir = tmp_path / "run"
    proc = run_cli("data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=16", "data.crop_size=16",
                   "data.batch_size=32", "data.num_workers=0", "backbone.width=8", "trainer.max_epochs=1",
                   "eval=final_only", "eval.final.random_baseline=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["eval_val_split"] == "val" and results["eval_val_items"] == 32
    assert results["knn_top1"] > 75.0  # two colours are easy to tell apart


def test_resume_from_last_checkpoint_continues_training(tmp_path):
    common = [*TINY, "method=moco_v2", "eval=final_only", "eval.final.random_baseline=false"]
    first = run_cli(*common, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    second = run_cli(*common, "trainer.max_epochs=2", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["epochs"] == 2
    import torch

    state = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 * (1437 // 128)  # digits train split, drop_last
