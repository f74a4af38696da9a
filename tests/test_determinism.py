"""Same seed, same config, CPU: the same loss curve and results; memory stays flat over a long run."""

import csv
import json
import os

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

TIMING = {"wall_time_s", "train_time_s", "train_images_per_s", "data_wait_fraction", "peak_memory_mib", "run_dir"}
RSS_GROWTH_BOUND_MIB = 20  # resident memory may not grow more than this after the first epoch


def run(run_dir, *args, env=None):
    return run_cli("data=digits", "backbone.width=8", "method.warmup_epochs=0", "eval.knn.every_n_epochs=1",
                   "eval.final.linear_epochs=3", "eval.final.random_baseline=false", f"hydra.run.dir={run_dir}", *args,
                   timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def curve(run_dir) -> list[tuple[str, str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(r["step"], r.get("train/loss", ""), r.get("eval/knn_top1", "")) for r in csv.DictReader(f)]


def test_same_seed_same_curve_and_results(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        proc = run(d, "method=byol", "data.batch_size=128", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
                   "trainer.log_every_n_steps=1")  # two epochs: the second's order and views come from (seed, epoch)
        assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [row for row in curve(a) if row[1]]
    assert len(losses) == 10 and curve(a) == curve(b)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


def test_memory_stays_flat_over_a_long_run_with_monitors(tmp_path):
    trace = tmp_path / "rss.json"
    proc = run(tmp_path / "run", "data.batch_size=32", "trainer.max_epochs=4", "+eval.mem._target_=tests.signals.MemoryTrace",
               "~eval.final", "~eval.health",  # traced: the training steps; the evaluations after them are not
               env={"MEMORY_TRACE": str(trace)})  # 176 steps, kNN monitor and online probe every epoch
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(trace.read_text())
    steps_per_epoch = 1437 // 32
    assert len(rss) == 4 * steps_per_epoch
    growth = max(rss[steps_per_epoch:]) - rss[steps_per_epoch - 1]
    print(f"resident memory: {rss[0]:.0f} MiB at step 1, {rss[steps_per_epoch - 1]:.0f} after epoch 1, "
          f"{rss[-1]:.0f} at step {len(rss)}; growth after epoch 1: {growth:.1f} MiB")
    assert growth < RSS_GROWTH_BOUND_MIB
