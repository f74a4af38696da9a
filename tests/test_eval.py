"""Evaluation: weighted kNN, linear probe, feature extraction and the evaluation callbacks (CPU, small fakes)."""

from __future__ import annotations

import contextlib
import logging
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from src.callbacks.final_eval import FinalEvaluation
from src.callbacks.knn_monitor import KNNMonitor
from src.callbacks.online_probe import OnlineLinearProbe
from src.callbacks.throughput import ThroughputMonitor
from src.nn.knn import knn_predict, knn_top1
from src.nn.linear_probe import train_linear_probe
from src.protocols.features import extract_features

NUM_CLASSES = 3


# ---------------------------------------------------------------- kNN
def _naive_knn(bank, bank_y, queries, num_classes, k, temperature):
    preds = []
    for q in queries:
        sims = [float(q @ b / (q.norm() * b.norm())) for b in bank]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[: min(k, len(sims))]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(bank_y[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 20, 1000])
def test_knn_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    bank, queries = (
        torch.randn(150, 8, generator=g, dtype=torch.float64),
        torch.randn(40, 8, generator=g, dtype=torch.float64),
    )
    bank_y = torch.randint(0, 5, (150,), generator=g)
    fast = knn_predict(bank, bank_y, queries, 5, k=k, temperature=0.1, chunk_size=7)
    assert torch.equal(fast, _naive_knn(bank, bank_y, queries, 5, k, 0.1))


def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    y, qy = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (50,), generator=g)
    axes = torch.eye(16)[:4] * 5
    bank, queries = (
        axes[y] + 0.3 * torch.randn(200, 16, generator=g),
        axes[qy] + 0.3 * torch.randn(50, 16, generator=g),
    )
    assert knn_top1(bank, y, queries, qy, 4, k=20) == 100.0


# ---------------------------------------------------------------- linear probe
def _blobs(n, dim=32, classes=4, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * sep
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g) * 3 + 10, y  # offset/scale: standardisation matters


def test_linear_probe_separable_random_and_deterministic():
    (x, y), (vx, vy) = _blobs(400, seed=1), _blobs(400, seed=2)
    res = train_linear_probe(x, y, vx, vy, 4, epochs=100)
    assert res["top1"] >= 99.0 and res["top5"] == 100.0
    assert train_linear_probe(x, y, vx, vy, 4, epochs=100) == res
    random_y = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(3))
    chance = train_linear_probe(
        x, random_y, vx, torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(4)), 4
    )
    assert 12.0 < chance["top1"] < 38.0


# ---------------------------------------------------------------- fakes following the contracts
class Views:
    def eval_view(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255.0 - 0.5) / 0.25


class TinyBackbone(nn.Module):
    out_dim = 16

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3))


class FakeMethod(L.LightningModule):
    """training_step only returns a zero-gradient loss: any change to the module would come from callbacks."""

    feature_dim = TinyBackbone.out_dim

    def __init__(self):
        super().__init__()
        self.backbone, self.views = TinyBackbone(), Views()

    def forward(self, x):
        return self.backbone(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        return {"views": [self.views.eval_view(images)], "image": images, "label": labels}

    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in self.parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _images(n, seed, labelled=True):
    """Class c has a bright channel c: learnable from frozen random conv features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.full((n, 3, 8, 8), 40.0)
    x[torch.arange(n), y] = 200.0
    x = (x + torch.randint(-30, 30, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return x, (y if labelled else torch.full_like(y, -1))


class FakeData(L.LightningDataModule):
    def __init__(self, labelled=True):
        super().__init__()
        self.num_classes, self.has_labels, self.eval_split_names = NUM_CLASSES, labelled, ("train", "test")
        self.train_set = TensorDataset(*_images(96, 0, labelled))
        self.val_set = TensorDataset(*_images(48, 1, labelled))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def eval_train_dataloader(self):
        return DataLoader(self.train_set, batch_size=32)

    def eval_val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def _fit(datamodule, callbacks, logger=None, max_epochs=2):
    torch.manual_seed(0)
    method = FakeMethod()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=logger or False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    before = {k: v.clone() for k, v in method.state_dict().items()}
    trainer.fit(method, datamodule=datamodule)
    return trainer, method, before


def _random_model():
    return TinyBackbone()


# ---------------------------------------------------------------- feature extraction
def test_extract_features_keeps_modes_and_bn_stats():
    method = FakeMethod()
    method.train()
    method.backbone.drop.eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in method.named_modules()}
    buffers = {k: v.clone() for k, v in method.state_dict().items()}
    feats, labels = extract_features(method, method.views, FakeData().eval_val_dataloader(), "cpu", max_items=40)
    assert (
        feats.shape == (40, TinyBackbone.out_dim) and feats.dtype == torch.float32 and labels.shape == (40,)
    )
    assert {n: m.training for n, m in method.named_modules()} == flags
    assert all(torch.equal(v, method.state_dict()[k]) for k, v in buffers.items())
    # the callable variant gives the same features
    again, _ = extract_features(
        method.backbone, method.views, FakeData().eval_val_dataloader(), "cpu", 40
    )
    assert torch.allclose(again, feats)


def test_max_items_spans_a_class_sorted_dataset():
    images = torch.randint(0, 255, (90, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(30)  # sorted by class, like a folder dataset
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    feats, got = extract_features(FakeMethod(), FakeMethod().views, loader, "cpu", max_items=9)
    assert feats.shape[0] == 9 and set(got.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------- callbacks in a real Trainer
def test_callbacks_in_trainer(tmp_path):
    throughput, probe = ThroughputMonitor(), OnlineLinearProbe()
    knn, final = KNNMonitor(k=10), FinalEvaluation(random_model=_random_model, k=10, linear_epochs=50)
    logger = MemoryLogger()
    trainer, method, before = _fit(FakeData(), [throughput, probe, knn, final], logger)

    # the callbacks alone change nothing in the method (parameters, BN buffers)
    after = method.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())

    assert set(probe.metrics) == {"eval/online_train_top1", "eval/online_val_top1"}
    assert probe.metrics["eval/online_val_top1"] > 100 / NUM_CLASSES + 15
    assert set(knn.metrics) == {"eval/knn_top1"} and knn.metrics["eval/knn_top1"] > 60
    for key in ("eval/online_train_top1", "eval/online_val_top1", "eval/knn_top1", "perf/images_per_s"):
        assert key in trainer.logged_metrics or key in logger.metrics, key

    res = final.results
    assert set(res) == {
        "knn_top1",
        "linear_top1",
        "linear_top5",
        "random_knn_top1",
        "random_linear_top1",
        "random_linear_top5",
        "eval_train_split",
        "eval_val_split",
        "eval_train_items",
        "eval_val_items",
    }
    assert res["eval_train_items"] == 96 and res["eval_val_items"] == 48 and res["eval_val_split"] == "test"
    assert res["linear_top1"] > 80 and all(isinstance(v, (int, float, str)) for v in res.values())
    assert (
        logger.metrics["eval/linear_top1"] == res["linear_top1"] and "eval/random_knn_top1" in logger.metrics
    )

    assert set(throughput.results) == {
        "train_images_per_s",
        "data_wait_fraction",
        "peak_memory_mib",
        "peak_memory_kind",
        "train_time_s",
    }
    assert throughput.results["train_images_per_s"] > 0 and 0 <= throughput.results["data_wait_fraction"] < 1
    assert (
        throughput.results["peak_memory_kind"] == "cpu_peak_rss" and throughput.results["peak_memory_mib"] > 0
    )

    # the random baseline runs under fork_rng: the global RNG ends where it would without it
    states = []
    for factory in (None, _random_model):
        torch.manual_seed(123)
        cb = FinalEvaluation(random_model=factory, k=10, linear_epochs=5)
        cb.on_train_end(trainer, method)
        states.append(torch.get_rng_state())
        assert ("random_knn_top1" in cb.results) == (factory is not None)
    assert torch.equal(states[0], states[1])

    # the probe and its optimizer survive a checkpoint round trip
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][probe.state_key]
    fresh = OnlineLinearProbe()
    fresh.load_state_dict(state)  # Lightning restores callbacks before on_fit_start
    fresh.on_fit_start(trainer, method)
    assert torch.equal(fresh.probe.weight, probe.probe.weight) and torch.equal(
        fresh.probe.bias, probe.probe.bias
    )
    exp_avg = [s["exp_avg"] for s in probe.optimizer.state_dict()["state"].values()]
    assert all(
        torch.equal(a, s["exp_avg"])
        for a, s in zip(exp_avg, fresh.optimizer.state_dict()["state"].values(), strict=True)
    )
    assert fresh.metrics == probe.metrics


@contextlib.contextmanager
def lightning_info():
    """The messages Lightning's logger gets at INFO level inside the block (a list, filled as they come)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    lg = logging.getLogger("lightning.pytorch")
    lg.addHandler(handler)
    old_level = lg.level
    lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)


def test_callbacks_skip_unlabelled_data():
    with lightning_info() as records:
        probe, knn, final = (
            OnlineLinearProbe(),
            KNNMonitor(),
            FinalEvaluation(random_model=_random_model),
        )
        _fit(FakeData(labelled=False), [ThroughputMonitor(), probe, knn, final])
    assert probe.metrics == {} and knn.metrics == {}
    assert final.results == {"eval_skipped": "data has no labels"}
    for msg in ("online probe skipped", "kNN monitor skipped", "final evaluation skipped"):
        assert sum(msg in r for r in records) == 1, (msg, records)


# ---------------------------------------------------------------- online probe: which features it trains on
class FakeEmbedMethod(FakeMethod):
    """Its step runs the backbone on the first view in train mode and keeps the detached features, as
    SSLMethod.embed does; ``forward`` calls (evaluation's passes) are counted."""

    def __init__(self):
        super().__init__()
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        return super().forward(x)

    def training_step(self, batch, batch_idx):
        feats = self.backbone(batch["views"][0])
        self.first_view_features = feats.detach()  # SSLMethod resets them when the next batch arrives
        return feats.sum() * 0.0


def _fit_method(method, callbacks, max_epochs=2):
    torch.manual_seed(0)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(method, datamodule=FakeData())
    return trainer


def test_online_probe_train_view_reuses_the_steps_features():
    """features=train_view: no second pass over the training batches (forward never runs while training), the
    probe learns, and the method (its step updates BatchNorm statistics) ends exactly as without the probe."""
    torch.manual_seed(0)
    plain = FakeEmbedMethod()
    _fit_method(plain, [])
    torch.manual_seed(0)
    probe, method = OnlineLinearProbe(features="train_view", lr=1e-2, val_every_n_epochs=10), FakeEmbedMethod()
    trainer = _fit_method(method, [probe])  # no val evaluation during the fit: its loaders would draw global RNG
    assert method.forward_calls == 0
    after = method.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in plain.state_dict().items())
    assert method.first_view_features is not None  # the probe reads them and leaves the method's state alone
    assert probe.metrics["eval/online_train_top1"] > 100 / NUM_CLASSES + 15
    assert probe.evaluate(trainer, method) > 100 / NUM_CLASSES + 15

    eval_pass, method = OnlineLinearProbe(features="eval_pass", lr=1e-2, val_every_n_epochs=10), FakeEmbedMethod()
    _fit_method(method, [eval_pass])
    assert method.forward_calls == 2 * math.ceil(96 / 16)  # one more pass per training batch
    assert not torch.equal(eval_pass.probe.weight, probe.probe.weight)


def test_online_probe_falls_back_to_the_eval_pass_once():
    """A method whose step keeps no first-view features: train_view trains exactly as eval_pass, saying so once."""
    with lightning_info() as records:
        fallback = OnlineLinearProbe(features="train_view")
        torch.manual_seed(0)
        _fit_method(FakeMethod(), [fallback])
    assert sum("computes no plain features" in r for r in records) == 1, records
    eval_pass = OnlineLinearProbe(features="eval_pass")
    torch.manual_seed(0)
    _fit_method(FakeMethod(), [eval_pass])
    assert torch.equal(fallback.probe.weight, eval_pass.probe.weight) and fallback.metrics == eval_pass.metrics
    with pytest.raises(ValueError, match="features"):
        OnlineLinearProbe(features="second_pass")


def test_online_probe_train_view_ignores_unknown_labels_and_non_finite_rows():
    """Rows labelled -1 or with non-finite features (a step skipped for a non-finite loss) get zero weight: the
    probe moves exactly as on the other rows alone, and stays finite."""
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(8, 16, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)
    noisy, noisy_labels = feats.clone(), labels.clone()
    noisy[1, 3], noisy[5] = float("nan"), float("inf")
    noisy_labels[2] = -1
    rows = torch.tensor([0, 3, 4, 6, 7])
    probes = []
    for x, y in ((noisy, noisy_labels), (feats[rows], labels[rows])):
        probe = OnlineLinearProbe(features="train_view", lr=0.1)
        probe.probe = nn.Linear(16, NUM_CLASSES)
        nn.init.zeros_(probe.probe.weight), nn.init.zeros_(probe.probe.bias)
        probe.optimizer = torch.optim.AdamW(probe.probe.parameters(), lr=0.1, weight_decay=0.0)
        probe.on_train_epoch_start(None, FakeMethod())
        for _ in range(3):
            probe._train_on_view(None, x, y)
        probes.append(probe)
    noisy_probe, clean_probe = probes
    assert torch.isfinite(noisy_probe.probe.weight).all()
    torch.testing.assert_close(noisy_probe.probe.weight, clean_probe.probe.weight)
    assert int(noisy_probe._seen) == int(clean_probe._seen) == 15 and int(noisy_probe._correct) == int(clean_probe._correct)


@pytest.mark.parametrize("features", ["train_view", "eval_pass"])
def test_online_probe_train_view_adds_no_host_device_sync(features):
    """On the default method (SimCLR, tiny), the train_view probe adds nothing that would sync a GPU to any
    training batch (tests/syncs.py); the eval pass selects the labelled images (boolean indexing) every batch."""
    from hydra.utils import instantiate

    from tests.helpers import tiny_cfg
    from tests.syncs import SyncCounter

    events = []
    for callbacks in ([], [OnlineLinearProbe(features=features, val_every_n_epochs=10)]):
        cfg = tiny_cfg("simclr")
        L.seed_everything(0)
        method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=callbacks)
        counter = SyncCounter()
        counter.attach(method, trainer)
        try:
            trainer.fit(method, datamodule=instantiate(cfg.data))
        finally:
            counter.detach()
        events.append(dict(counter.events))
    plain, probed = events
    if features == "train_view":
        assert probed == plain
    else:
        assert all("aten.index.Tensor" in probed[k] for k in range(4))


def test_final_evaluation_holds_out_training_images_for_choices(tmp_path):
    """val_* results use a seeded part of the labelled training split as queries (what sweeps optimise); the test
    split's numbers are the same as without it."""
    plain, held = FinalEvaluation(k=10, linear_epochs=20), FinalEvaluation(k=10, linear_epochs=20, holdout_fraction=0.25)
    _fit(FakeData(), [plain, held], MemoryLogger())
    assert held.results["eval_holdout_items"] == 24 and {"val_knn_top1", "val_linear_top1"} <= held.results.keys()
    assert {k: held.results[k] for k in plain.results} == plain.results
    assert 0 <= held.results["val_knn_top1"] <= 100
    with pytest.raises(ValueError, match="holdout_fraction"):
        FinalEvaluation(holdout_fraction=1.0)
