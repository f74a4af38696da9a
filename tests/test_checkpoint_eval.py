"""`python -m src.eval CKPT`: safe loading, a clear line for the wrong backbone, the run's own numbers back."""

import json
import os

import pytest
import torch

from tests.helpers import run_cli, run_module

pytestmark = pytest.mark.slow


def run_eval(*args):
    return run_module("src.eval", *args)


def one_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = run_cli("data=digits", "backbone.width=8", "data.batch_size=128", "trainer.max_epochs=1",
                   "method.warmup_epochs=0", "eval=final_only", "eval.final.linear_epochs=10",
                   "eval.final.protocols=[knn]", "protocols.knn.ks=[5,20]", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_checkpoint_evaluates_to_its_runs_own_numbers(run_dir):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_eval(str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((run_dir / "checkpoints" / "last.ckpt.eval.json").read_text())
    want = json.loads((run_dir / "results.json").read_text())
    assert (got["knn_top1"], got["linear_top1"]) == (want["knn_top1"], want["linear_top1"])
    # every figure of the run's final evaluation, random-init baseline and protocols included, is reproduced
    figures = [k for k in want if k.startswith(("knn_", "linear_", "val_", "random_", "eval_"))]
    assert {"random_knn_top1", "random_linear_top1", "val_knn_top1", "knn_top1_k5", "random_knn_top1_k20",
            "eval_holdout_items"} <= set(figures)
    assert {k: got.get(k) for k in figures} == {k: want[k] for k in figures}
    assert got["method"] == "simclr" and got["data"] == "digits" and "kNN top-1 (%)" in proc.stdout
    assert got["epochs"] == want["epochs"] == 1  # epochs trained, not the 0-based index of the last one


def test_the_wrong_backbone_is_one_line_naming_the_right_one(run_dir):
    line = one_error(run_eval(str(run_dir / "checkpoints" / "last.ckpt"), "backbone=resnet18"))
    assert "does not hold a ResNet backbone" in line and "its run used backbone=convnet" in line


class Thing:
    """An object a safe load refuses (not a tensor or plain value)."""


def test_training_from_a_checkpoint_that_does_not_fit_is_one_line(run_dir, tmp_path):
    """``src.train ckpt_path=<file>`` reads the file as src.eval does: one line, not a traceback, nothing written."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    notes, evil = tmp_path / "notes.ckpt", tmp_path / "evil.ckpt"
    notes.write_text("hello")
    torch.save({"state_dict": {}, "payload": Thing()}, evil)
    common = ("data=digits", "data.batch_size=128", "eval=none", f"hydra.run.dir={tmp_path}/r")
    cases = {notes: ("backbone.width=8",), evil: ("backbone.width=8",), ckpt: ("backbone=resnet18",),
             ckpt / "..": ("backbone.width=8",)}
    lines = [one_error(run_cli(*common, f"ckpt_path={path}", *extra)) for path, extra in cases.items()]
    assert "is not a readable checkpoint" in lines[0] and "holds Python objects" in lines[1]
    assert "does not hold a ResNet backbone" in lines[2] and "its run used backbone=convnet" in lines[2]
    assert "is not a file" in lines[3] and not (tmp_path / "r").exists()


def test_the_wrong_width_is_one_line(run_dir):
    line = one_error(run_eval(str(run_dir / "checkpoints" / "last.ckpt"), "backbone.width=16"))
    assert "of another shape" in line


def test_an_unsafe_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    line = one_error(run_eval(str(path)))
    assert "not loaded (safe loading, weights_only=True)" in line
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    assert "is not a readable checkpoint" in one_error(run_eval(str(path)))
    assert "is not a file" in one_error(run_eval(str(tmp_path / "missing.ckpt")))


def test_a_bare_backbone_with_downloaded_weights_is_evaluated_the_same_way(tmp_path):
    """No checkpoint: `python -m src.eval backbone=... backbone.pretrained=FILE` (a state dict saved elsewhere,
    with a prefix) gives the kNN and linear numbers of those weights; a file of another size is one line."""
    from src.backbones.vit import ViT

    torch.manual_seed(0)
    vit = ViT(img_size=16, patch_size=4, in_channels=1, embed_dim=32, depth=2, num_heads=2)
    weights = tmp_path / "downloaded.pth"
    torch.save({"model": {f"module.{k}": v for k, v in vit.net.state_dict().items()}}, weights)
    common = ["data=digits", "backbone=vit_cpu", "backbone.depth=2", "backbone.num_heads=2", "eval=final_only",
              "eval.final.linear_epochs=10"]
    proc = run_eval(*common, "backbone.embed_dim=32", f"backbone.pretrained={weights}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "downloaded.pth.eval.json").read_text())
    assert results["weights"] == str(weights) and results["backbone"] == "vit_cpu"
    assert 15.0 < results["knn_top1"] <= 100.0 and results["eval_val_items"] == 360  # digits' test split
    line = one_error(run_eval(*common, "backbone.embed_dim=64", f"backbone.pretrained={weights}"))
    assert "does not fit this ViT (64 wide, depth 2)" in line


def test_a_checkpoint_transfers_to_another_dataset(run_dir):
    """Pre-trained on digits (16 px), measured on Fashion-MNIST (28 px, same channel count): data=<other>."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_eval(str(ckpt), "data=fashion_mnist", "eval.final.max_train_items=2000",
                    "eval.final.max_val_items=2000", "eval.final.linear_epochs=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "checkpoints" / "last.ckpt.eval.json").read_text())
    assert results["data"] == "fashion_mnist" and results["eval_val_items"] == 2000
    assert results["knn_top1"] > 30.0  # 10 classes: chance is 10%
