"""Representation health: the collapse measures on known embeddings, and the callback's one warning line on a
forced collapse (every backbone weight zeroed) but not on a healthy (randomly initialised) backbone."""

import warnings

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from src.callbacks.health import RepresentationHealth
from src.nn.health import alignment, rankme, std_ratio, uniformity
from tests.helpers import tiny_cfg


def test_measures_on_known_embeddings():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, 32, generator=g)
    point = torch.ones(4000, 32) + 1e-6 * torch.randn(4000, 32, generator=g)
    assert std_ratio(spread) == pytest.approx(1.0, abs=0.05) and std_ratio(point) < 1e-3
    assert rankme(spread) > 0.9 * 32 and rankme(point) < 1.1
    assert rankme(torch.randn(4000, 3, generator=g) @ torch.randn(3, 32, generator=g)) < 3.01  # rank 3
    assert alignment(spread, spread) == pytest.approx(0.0, abs=1e-6) and alignment(spread, -spread) == pytest.approx(4.0)
    assert uniformity(point[:500]) == pytest.approx(0.0, abs=1e-4) and uniformity(spread[:500]) < -1.5


def run_health(zero_weights: bool):
    L.seed_everything(0)
    cfg = tiny_cfg("simclr", "method.optimizer.lr=1e-12")  # one step that changes nothing
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    if zero_weights:
        with torch.no_grad():
            for p in method.backbone.parameters():
                p.zero_()
    health = RepresentationHealth(every_n_epochs=1, max_items=64)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[health])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(method, datamodule=instantiate(cfg.data))
    said = [str(w.message) for w in caught if "representation collapse" in str(w.message)]
    return health.results, said


def test_a_forced_collapse_is_said_once_and_recorded():
    results, said = run_health(zero_weights=True)
    assert results["collapsed"] is True and results["collapsed_at_epoch"] == 1
    assert len(said) == 1 and "std x sqrt(d) = 0.000" in said[0]


def test_a_healthy_backbone_is_not_called_collapsed():
    results, said = run_health(zero_weights=False)
    assert results["collapsed"] is False and not said and "collapsed_at_epoch" not in results
    assert results["health_rankme"] > 2 and "health_alignment" in results  # SimCLR makes two views
