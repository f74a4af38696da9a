"""Every conf/method/*.yaml composes and trains a few steps on CPU; MoCo's state checkpoints exactly."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from src.utils.config import compose
from tests.helpers import METHODS, tiny_cfg


def build(cfg):
    dm = instantiate(cfg.data)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    return method, dm


def fit(method, dm, steps: int, **trainer_kwargs):
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)
    trainer.fit(method, datamodule=dm)
    return trainer


@pytest.mark.parametrize("name", METHODS)
def test_method_config_composes_and_trains(name):
    cfg = tiny_cfg(name)
    L.seed_everything(0)
    method, dm = build(cfg)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit(method, dm, steps=4, callbacks=[Record()])
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    changed = [k for k, v in method.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any("weight" in k for k in changed), "the backbone did not learn"


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_on_a_fixed_batch(name):
    cfg = tiny_cfg(name)
    L.seed_everything(0)
    method, dm = build(cfg)
    dm.setup("fit")
    images = torch.stack([dm.pretrain[i][0] for i in range(16)])
    torch.manual_seed(0)
    views = method.views(images)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    state = {n: b.clone() for n, b in method.named_buffers()}  # queues etc. held fixed: same batch, same state
    losses = []
    for _ in range(15):
        for n, b in method.named_buffers():
            b.copy_(state[n])
        out = method.training_loss(views)
        loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_moco_variants_follow_the_papers():
    v1, v2 = compose(["method=moco_v1"]), compose(["method=moco_v2"])
    assert v1.method.temperature == 0.07 and not v1.method.mlp_head and v1.views.crops[0].blur_p == 0
    assert v2.method.temperature == 0.2 and v2.method.mlp_head and v2.views.crops[0].blur_p == 0.5
    assert compose(["method=moco"]).method == v2.method
    assert compose(["method=moco", "views=none"]).views.crops[0].scale == [1.0, 1.0], "command line views wins"


def test_moco_key_encoder_follows_by_ema_and_stays_frozen():
    cfg = tiny_cfg("moco_v2")
    L.seed_everything(0)
    method, dm = build(cfg)
    k0 = [p.clone() for p in method.backbone_k.parameters()]
    fit(method, dm, steps=2)
    assert all(not p.requires_grad for p in method.backbone_k.parameters())
    moved = [not torch.equal(a, b) for a, b in zip(k0, method.backbone_k.parameters(), strict=True)]
    assert any(moved)
    m = cfg.method.momentum
    # after one more manual EMA step the key encoder is the documented mix of key and query weights
    from src.nn.ema import update_momentum

    before = [p.clone() for p in method.backbone_k.parameters()]
    update_momentum(method.backbone, method.backbone_k, m)
    for b, q, k in zip(before, method.backbone.parameters(), method.backbone_k.parameters(), strict=True):
        torch.testing.assert_close(k, m * b + (1 - m) * q)


def test_ema_updates_once_per_optimizer_step_under_accumulation():
    cfg = tiny_cfg("moco_v2")
    L.seed_everything(0)
    method, dm = build(cfg)
    calls = []
    import src.methods.base as base

    original = base.update_momentum
    base.update_momentum = lambda *a: (calls.append(1), original(*a))
    try:
        fit(method, dm, steps=3, accumulate_grad_batches=2)  # 6 micro-batches, 3 optimizer steps
    finally:
        base.update_momentum = original
    assert len(calls) == 3 * len(method.momentum_pairs())


def test_moco_queue_and_pointer_survive_a_checkpoint(tmp_path):
    cfg = tiny_cfg("moco_v2")
    L.seed_everything(0)
    method, dm = build(cfg)
    trainer = fit(method, dm, steps=3)
    assert int(method.queue_ptr) == 3 * 16 % 64
    path = tmp_path / "moco.ckpt"
    trainer.save_checkpoint(path)
    fresh, _ = build(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    fresh.load_state_dict(state)
    assert torch.equal(fresh.queue, method.queue) and int(fresh.queue_ptr) == int(method.queue_ptr)
    assert torch.equal(fresh.queue[:48], method.queue[:48]) and not torch.equal(fresh.queue[:16], fresh.queue[16:32])


def test_param_groups_exclude_norms_and_biases_from_weight_decay():
    cfg = tiny_cfg("simclr")
    method, _ = build(cfg)
    decay, no_decay = method.param_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(1 for p in method.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n
