"""Evaluation protocols: numerics against naive formulas, balanced reproducible subsets and their list files, the
few-shot confidence interval, ViT layer-wise decay, every protocol end to end through the CLI (final evaluation,
``python -m src.eval CKPT protocol=...``, ``python -m src.report``), and a collapse forced by training (SimSiam
without its stop-gradient) that the health callback reports."""

import json
import math
import warnings

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from src.callbacks.health import RepresentationHealth
from src.config.compose import group_options
from src.nn.knn import knn_predict_sweep, knn_top1
from src.nn.metrics import accuracy
from src.protocols.data import balanced_subset, read_subset, write_subset
from src.protocols.fewshot import episode, mean_interval
from src.protocols.finetune import layer_ids, param_groups
from tests.helpers import run_cli, run_module, tiny_cfg


def test_knn_sweep_matches_one_k_at_a_time_and_a_naive_vote():
    g = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(300, 16, generator=g), torch.randint(0, 5, (300,), generator=g), torch.randn(40, 16, generator=g)
    truth = torch.randint(0, 5, (40,), generator=g)
    preds = knn_predict_sweep(bank, labels, queries, 5, [1, 7, 50, 1000], 0.1, chunk_size=16)
    for k, p in preds.items():
        assert accuracy(p, truth, 5) == pytest.approx(knn_top1(bank, labels, queries, truth, 5, k, 0.1))
    b, q = torch.nn.functional.normalize(bank, dim=1), torch.nn.functional.normalize(queries, dim=1)
    for i in range(40):  # naive: sort similarities, sum exp(sim / T) per class over the 7 nearest
        sims = b @ q[i]
        votes = torch.zeros(5)
        for j in sims.argsort(descending=True)[:7]:
            votes[labels[j]] += math.exp(float(sims[j]) / 0.1)
        assert int(votes.argmax()) == int(preds[7][i])


def test_accuracy_is_the_share_of_samples_right():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    y = torch.tensor([1, 2, 0, 0])
    assert accuracy(logits, y, 3, 1) == pytest.approx(50.0)  # rows 1 and 3 right
    assert accuracy(logits, y, 3, 2) == pytest.approx(75.0)  # row 0: 1 is second; row 2: 0 is third
    assert accuracy(torch.tensor([1, 2, 2, 0]), y, 3) == pytest.approx(75.0)


def test_balanced_subsets_are_per_class_reproducible_and_round_trip(tmp_path):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 50, 7])] + [torch.full((5,), -1)])
    idx = balanced_subset(labels, 0.1, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [10, 5, 1]  # round(0.1 x n), at least one; never -1
    assert torch.equal(idx, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=4))
    assert balanced_subset(labels, 1.0, 0).numel() == 157

    class Folder(torch.utils.data.Dataset):  # a folder dataset's shape: samples of (path, class) under root
        root = tmp_path / "train"
        samples = [(str(tmp_path / "train" / f"c{c}" / f"{c}_{i}.png"), c) for i in range(20) for c in (0, 1)]

        def __len__(self):
            return len(self.samples)

    folder = Folder()
    chosen = torch.tensor([1, 4, 9, 30])
    write_subset(tmp_path / "subset.txt", chosen, folder, "a test subset")
    lines = (tmp_path / "subset.txt").read_text().splitlines()
    assert lines[0].startswith("#") and lines[1] == "c1/1_0.png"
    assert torch.equal(read_subset(tmp_path / "subset.txt", folder), chosen)
    (tmp_path / "bare.txt").write_text("0_2.png\n1_4.png\n")  # SimCLR's lists name bare files
    assert read_subset(tmp_path / "bare.txt", folder).tolist() == [4, 9]
    (tmp_path / "bad.txt").write_text("nope.png\n")
    with pytest.raises(Exception, match="1 of 1 entries are not in the split"):
        read_subset(tmp_path / "bad.txt", folder)


def test_fewshot_episodes_and_the_confidence_interval():
    values = [61.0, 64.0, 58.5, 70.25, 66.0, 59.0, 62.5, 68.0, 63.0, 60.5]
    mean, half = mean_interval(values, 0.95)
    sd = (sum((v - sum(values) / 10) ** 2 for v in values) / 9) ** 0.5
    assert mean == pytest.approx(sum(values) / 10)
    assert half == pytest.approx(2.262157 * sd / math.sqrt(10), rel=1e-5)  # t(0.975, 9 degrees of freedom)
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    pick = episode(labels, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[pick]).tolist() == [5, 5, 5] and pick.unique().numel() == 15


def test_layer_decay_scales_each_vit_block():
    cfg = tiny_cfg("mae")  # a 2-block ViT
    backbone = instantiate(cfg.backbone)
    ids = layer_ids(backbone)
    assert ids["net.patch_embed.proj.weight"] == 0 and ids["net.blocks.0.attn.qkv.weight"] == 1
    assert ids["net.blocks.1.mlp.fc1.weight"] == 2 and ids["net.norm.weight"] == 3
    groups = param_groups(backbone, torch.nn.Linear(32, 10), 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(backbone.named_parameters())
    assert scale[id(params["net.blocks.0.attn.qkv.weight"])] == 0.25  # 0.5^(3 - 1)
    assert scale[id(params["net.norm.weight"])] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(params["net.blocks.0.attn.qkv.bias"])] == 0.0 and decay[id(params["net.blocks.0.attn.qkv.weight"])] == 0.05
    convnet = instantiate(tiny_cfg("simclr").backbone)
    with pytest.raises(Exception, match="is for ViT backbones"):
        param_groups(convnet, torch.nn.Linear(16, 10), 0.0, 0.75)


# ---- end to end through the CLI -------------------------------------------------------------------------------
pytest_slow = pytest.mark.slow
SMALL = ("protocols.fewshot.episodes=2", "protocols.fewshot.shots=[1,5]", "protocols.plot.max_items=150",
         "protocols.finetune.epochs=2", "protocols.linear.sgd_epochs=1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("protocols") / "run"
    proc = run_cli("data=digits", "backbone.width=8", "data.batch_size=128", "trainer.max_epochs=1",
                   "method.warmup_epochs=0", "eval=final_only", "eval.final.linear_epochs=10",
                   "eval.final.protocols=[knn,fewshot,plot]", *SMALL, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest_slow
def test_the_final_evaluation_runs_the_named_protocols(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    knn = json.loads((run_dir / "checkpoints" / "last.knn.json").read_text())
    assert results["knn_top1_k200"] == results["knn_top1"]  # the same protocol as the final kNN (k=200)
    assert knn["knn_top1_k10"] == results["knn_top1_k10"] and "random_knn_top1_k10" in knn
    assert {"fewshot_1shot_top1", "fewshot_5shot_ci", "random_fewshot_5shot_top1"} <= results.keys()
    assert (run_dir / "pictures" / "tsne_0001.png").is_file() and (run_dir / "pictures" / "random_tsne_0001.png").is_file()
    assert 0.5 < results["tsne_trustworthiness"] <= 1.0


@pytest_slow
def test_eval_cli_runs_protocols_and_reuses_the_finetune_subset(run_dir):
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_module("src.eval", str(ckpt), "protocol=finetune,linear", "protocols.finetune.label_fraction=0.1",
                      *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    subset = run_dir / "checkpoints" / "subset_10pct_seed0.txt"
    first = subset.read_text()
    assert len(first.splitlines()) == 1 + 142  # a header, then 10% of each digit class of the 1,437 train images
    got = json.loads((run_dir / "checkpoints" / "last.finetune_10pct.json").read_text())
    assert got["finetune_10pct_train_images"] == got["random_finetune_10pct_train_images"] == 142
    linear = json.loads((run_dir / "checkpoints" / "last.linear.json").read_text())
    assert 0 <= linear["sgd_linear_top1"] <= 100 and "random_sgd_linear_top1" in linear
    assert "finetune_10pct_top1" in proc.stdout and "random-init" in proc.stdout
    (run_dir / "checkpoints" / "last.finetune_10pct.json").unlink()
    proc = run_module("src.eval", str(ckpt), "protocol=finetune", "label_fraction=0.1", "epochs=1")  # bare keys
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert subset.read_text() == first  # the saved subset is read back, not drawn again
    bad = run_module("src.eval", str(ckpt), "protocol=finetunes")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: protocol=finetunes is not a protocol; allowed: {', '.join(group_options('protocol'))}"]


@pytest_slow
def test_a_bare_random_backbone_is_measured_against_the_same_initialisation():
    proc = run_module("src.eval", "backbone=convnet", "backbone.width=8", "data=digits", "protocol=knn", "ks=[5,50]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {ln.split()[0]: ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("knn_top1_k")}
    assert set(rows) == {"knn_top1_k5", "knn_top1_k50"} and all(a == b for a, b in rows.values())  # seeded alike


@pytest_slow
def test_report_collects_runs_and_their_protocol_files(run_dir, tmp_path):
    proc = run_module("src.report", str(run_dir), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert f"{results['knn_top1']:.2f} / {results['random_knn_top1']:.2f}" in text
    assert "fewshot_5shot_top1" in text and "knn_top1_k10" in text and (tmp_path / "report.png").stat().st_size > 1000
    empty = run_module("src.report", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "no such folder" in empty.stderr


def health_after_training(stop_gradient: bool) -> tuple[dict, list[str]]:
    L.seed_everything(0)
    cfg = tiny_cfg("simsiam", f"method.stop_gradient={stop_gradient}", "backbone.pool_grid=1", "data=digits",
                   "data.image_size=8", "data.crop_size=8", "data.batch_size=64", "method.optimizer.lr=3",
                   "method.optimizer.weight_decay=0.01", "method.min_lr_ratio=1.0")  # constant, high lr: collapse in
    # one epoch without the stop-gradient (measured on the global pool, the representation the paper's Fig. 2 tracks)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    health = RepresentationHealth(every_n_epochs=1, max_items=256)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[health])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(method, datamodule=instantiate(cfg.data))
    return health.results, [str(w.message) for w in caught if "collapse" in str(w.message)]


@pytest_slow
def test_simsiam_without_stop_gradient_collapses_and_is_reported():
    results, said = health_after_training(stop_gradient=False)
    assert results["collapsed"] is True and len(said) == 1 and "representation collapse" in said[0]
    results, said = health_after_training(stop_gradient=True)  # the same run with the stop-gradient: healthy
    assert results["collapsed"] is False and not said


def test_eval_figures_join_the_wandb_run_of_the_checkpoints_run(tmp_path, monkeypatch):
    import wandb
    from PIL import Image

    from src.config.compose import compose
    from src.utils.loggers import log_to_run_wandb

    seen = {}

    class FakeRun:
        summary: dict = {}

        def log(self, data):
            seen["log"] = data

        def finish(self):
            seen["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(init=kw) or FakeRun())
    cfg = compose(["logger=wandb", "logger.wandb.mode=offline"])
    results = {"knn_top1_k10": 80.0, "eval_val_split": "test"}
    assert not log_to_run_wandb(cfg, tmp_path, results, []) and not seen  # no .wandb_id: the run had no W&B run
    (tmp_path / ".wandb_id").write_text("abc123\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "last.tsne.png")
    assert log_to_run_wandb(cfg, tmp_path, results, [("tsne", tmp_path / "last.tsne.png")])
    assert seen["init"]["id"] == "abc123" and seen["init"]["resume"] == "allow" and seen["finished"]
    assert FakeRun.summary == {"eval/knn_top1_k10": 80.0} and list(seen["log"]) == ["eval/tsne"]
    assert not log_to_run_wandb(compose(["logger=csv"]), tmp_path, results, [])  # the run logged to CSV only
