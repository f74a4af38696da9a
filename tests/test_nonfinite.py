"""A non-finite loss stops the run with one line and keeps the last good checkpoint, or is skipped and counted."""

import json
import os

import pytest
import torch

from tests.helpers import run_cli

pytestmark = pytest.mark.slow

RUN = ["method=byol", "data=digits", "backbone.width=8", "data.batch_size=128", "trainer.max_epochs=2",
       "method.warmup_epochs=0", "eval=final_only", "eval.final.linear_epochs=5", "eval.final.random_baseline=false",
       "+eval.nan._target_=tests.signals.NaNAtStep"]
STEP = 14  # inside the second epoch (11 steps per epoch on digits at batch 128)


def _run(run_dir, *extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NAN_AT_STEP": str(STEP)}
    return run_cli(*RUN, f"hydra.run.dir={run_dir}", *extra, env=env)


def test_nonfinite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    proc = _run(tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == lines[-1:] and errors[0].startswith(f"error: non-finite loss nan at step {STEP}"), lines[-5:]
    assert "nonfinite_loss=skip" in errors[0] and "Traceback" not in proc.stderr
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 11  # the end of the first epoch: the last good state
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "results.json").exists()


def test_nonfinite_loss_can_be_skipped_counted_and_logged(tmp_path):
    proc = _run(tmp_path / "run", "nonfinite_loss=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_steps"] == 1 and results["knn_top1"] > 10
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 22 and state["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert "train/skipped_steps" in (tmp_path / "run" / "csv" / "metrics.csv").read_text()
