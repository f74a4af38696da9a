"""A killed or pre-empted run resumes to the same result; a checkpoint is never half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from src.utils.checkpointing import atomic_torch_save
from tests.helpers import ROOT, run_cli

pytestmark = pytest.mark.slow

# MoCo v2: an EMA key encoder, a queue, shuffled BatchNorm, an online probe and random views: all of it must resume
RUN = ["method=moco_v2", "method.queue_size=512", "data=digits", "backbone.width=8", "data.batch_size=128",
       "trainer.max_epochs=3", "method.warmup_epochs=1", "eval=final_only", "+eval.online_probe._target_="
       "src.callbacks.online_probe.OnlineLinearProbe", "eval.final.linear_epochs=10",
       "eval.final.random_baseline=false", "eval.final.protocols=[knn]", "+eval.signal._target_=tests.signals.SignalAtStep"]
STEPS_PER_EPOCH = 1437 // 128  # digits: 1,437 training images
TIMING = {"wall_time_s", "train_time_s", "train_images_per_s", "data_wait_fraction", "peak_memory_mib", "peak_memory_kind",
          "run_dir"}  # measured while training: a run resumed after its last step trains no more


def _run(run_dir, *extra, signal_at=None, signal_name="KILL"):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    if signal_at is not None:
        env.update(SIGNAL_AT_STEP=str(signal_at), SIGNAL_NAME=signal_name)
    return run_cli(*RUN, f"hydra.run.dir={run_dir}", *extra, env=env)


def _final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _same_run(reference, resumed):
    a, b = _final_state(reference), _final_state(resumed)
    assert a["global_step"] == b["global_step"] == 3 * STEPS_PER_EPOCH
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"not bit-identical after resuming: {different[:5]}"
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, resumed))
    assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    return ra


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_sigkill_mid_epoch_then_resume_auto_gives_the_same_weights_and_results(reference, tmp_path):
    step = int(torch.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH, (1,)))  # inside the second epoch
    run_dir = tmp_path / "run"
    killed = _run(run_dir, signal_at=step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _final_state(run_dir)["global_step"] == STEPS_PER_EPOCH  # only the end-of-epoch-1 checkpoint exists
    resumed = _run(run_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume=auto: continuing {run_dir}" in resumed.stdout
    results = _same_run(reference, run_dir)
    print(f"killed at step {step}; resumed; final weights bit-identical; results {results}")


def test_sigterm_saves_mid_epoch_and_resume_auto_continues_exactly(reference, tmp_path):
    step = int(torch.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH, (1,)))
    run_dir = tmp_path / "run"
    stopped = _run(run_dir, signal_at=step, signal_name="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and f"stopped by SIGTERM after step {step}" in lines[0] and "resume=auto" in lines[0]
    assert "Traceback" not in stopped.stderr
    assert _final_state(run_dir)["global_step"] == step  # saved at the batch it stopped on, mid-epoch
    assert not (run_dir / "results.json").exists()
    resumed = _run(run_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(reference, run_dir)
    again = _run(run_dir, "resume=auto")  # a finished run is not run again
    assert again.returncode == 0 and "already finished" in again.stdout


def test_a_run_killed_during_its_final_evaluation_finishes_it_on_resume(reference, tmp_path):
    """Killed after the last training step, during the final evaluation (no results.json yet): resume=auto and
    ckpt_path= both run the final evaluation and write the uninterrupted run's results."""
    run_dir = tmp_path / "run"
    killed = _run(run_dir, signal_at="end")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "results.json").exists() and _final_state(run_dir)["global_step"] == 3 * STEPS_PER_EPOCH
    resumed = _run(run_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "running the final evaluation now" in resumed.stdout + resumed.stderr
    results = _same_run(reference, run_dir)
    assert {"knn_top1", "linear_top1", "knn_top1_k10"} <= results.keys()  # the protocols the final evaluation runs too
    assert json.loads((run_dir / "checkpoints" / "last.knn.json").read_text())["knn_top1_k10"] == results["knn_top1_k10"]
    elsewhere = _run(tmp_path / "copy", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    again = json.loads((tmp_path / "copy" / "results.json").read_text())
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in results.items() if k not in TIMING}


def test_slurm_warning_signal_checkpoints_then_hands_over_to_the_requeue_handler(reference, tmp_path):
    """SIGUSR2 (SLURM's --signal warning under hydra/launcher=slurm): last.ckpt is written at the batch, then the
    handler installed before training (submitit's requeue; here a stand-in that records it) runs and exits; the
    requeued job (same folder, resume=auto) ends as the uninterrupted run."""
    step = int(torch.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH, (1,)))
    run_dir, marker = tmp_path / "run", tmp_path / "requeued.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline", "SIGNAL_AT_STEP": str(step),
           "SIGNAL_NAME": "USR2", "REQUEUE_MARKER": str(marker), "REQUEUE_CKPT": str(run_dir / "checkpoints" / "last.ckpt")}
    job = subprocess.run([sys.executable, "-m", "tests.requeue_runner", *RUN, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 255, job.stderr[-2000:]  # submitit's sys.exit(-1)
    assert json.loads(marker.read_text()) == {"signal": signal.SIGUSR2, "step": step}  # the checkpoint came first
    assert _final_state(run_dir)["global_step"] == step
    resumed = _run(run_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(reference, run_dir)


def test_resume_auto_ignores_runs_of_another_config(reference, tmp_path):
    proc = run_cli(*RUN, "seed=1", f"hydra.run.dir={reference}", "resume=auto", "trainer.max_epochs=1",
                   timeout=600)  # another config in the reference's folder: not continued, nothing overwritten
    assert "no run of this config" in proc.stdout, proc.stdout[-2000:]


def test_a_kill_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.arange(10.0)}, path)
    before = path.read_bytes()
    script = ("import sys, torch; from src.utils.checkpointing import atomic_torch_save; "
              "atomic_torch_save({'step': 2, 'w': torch.zeros(200_000_000, dtype=torch.uint8)}, sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".last.ckpt.tmp-*")) and time.time() < deadline:  # the write has begun
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_resumed_run_keeps_logging_to_the_same_wandb_run(tmp_path):
    run_dir, extra = tmp_path / "run", ["trainer.max_epochs=1", "logger=wandb", "logger.wandb.mode=offline"]
    stopped = _run(run_dir, *extra, signal_at=3, signal_name="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    resumed = _run(run_dir, *extra, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    assert len({p.name.rsplit("-", 1)[-1] for p in segments}) == 1  # one W&B run id for both parts


def test_two_process_ddp_run_stopped_mid_epoch_resumes_exactly(tmp_path):
    """hardware=ddp_cpu (2 gloo processes; Lightning re-launches the command for rank 1 into the same run folder):
    one results.json, from both ranks' batches; both ranks stop at the same batch, the checkpoint holds the data
    position of their slices, and the resumed run ends bit-identical."""
    ddp = ["hardware=ddp_cpu", "data.batch_size=64", "trainer.max_epochs=2"]  # global batch 128: 11 steps / epoch
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _run(reference, *ddp).returncode == 0
    results = json.loads((reference / "results.json").read_text())
    assert results["devices"] == 2 and results["effective_batch_size"] == 128 and results["knn_top1"] > 20.0
    assert [p.name for p in tmp_path.iterdir()] == ["reference"], "rank 1 must not create a second run folder"
    ddp += ["~eval.final", "~eval.health"]  # what is compared below: the weights (resuming the evaluation: above)
    stopped = _run(run_dir, *ddp, signal_at=STEPS_PER_EPOCH + 3, signal_name="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.count("interrupted:") == 1
    assert _final_state(run_dir)["global_step"] == STEPS_PER_EPOCH + 3
    resumed = _run(run_dir, *ddp, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final_state(reference), _final_state(run_dir)
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
