"""Every conf/method/*.yaml composes and trains a few steps on CPU; EMA targets, state buffers and
method-specific rules (DINO, SwAV, SimSiam, multi-crop) behave as their papers say."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

import src.methods.base as base
import src.methods.swav as swav_module
from src.config.compose import compose
from src.config.rules import config_problems
from src.methods.base import SSLMethod
from src.nn.ema import update_momentum
from src.nn.multicrop import num_global_views, view_pairs
from tests.helpers import METHODS, method_class, tiny_cfg, tiny_tokenizer


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


def trained(name: str, steps: int, *overrides: str):
    """(method, trainer) after ``steps`` optimizer steps of the tiny config of ``name``."""
    L.seed_everything(0)
    method, dm = build(tiny_cfg(name, *overrides))
    return method, fit(method, dm, steps=steps)


@pytest.mark.parametrize("name", METHODS)
def test_paper_config_passes_the_preflight_check(name):
    cls = method_class(name)
    overrides = ["data=cifar10"] if getattr(cls, "needs_colour", False) else []  # the default data is grayscale
    overrides += ["backbone=vit_small"] if getattr(cls, "needs_tokens", False) else []
    overrides += ["data=fake", f"method.tokenizer={tiny_tokenizer()}"] if name == "beit" else []  # RGB, stride 4
    overrides += ["data.captions=class_prompts"] if getattr(cls, "needs_captions", False) else []
    assert config_problems(compose([f"method={name}", *overrides])) == []


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
    batch = {"views": method.views(images), "image": images}
    if getattr(method, "tokenizer", None) is not None and len(dm.pretrain[0]) > 2:  # CLIP: the captions' tokens
        batch["text"] = method.tokenizer([dm.pretrain[i][2] for i in range(16)])
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-3)  # one lr for all loss scales
    state = {n: b.clone() for n, b in method.named_buffers()}  # queues etc. held fixed: same batch, same state
    losses = []
    for _ in range(15):
        for n, b in method.named_buffers():
            b.copy_(state[n])
        torch.manual_seed(1)  # the same pseudo-labels each time (rotations, permutations, masks, MoCo's shuffle)
        out = method.batch_loss(batch)
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


EMA_METHODS = [m for m in METHODS if method_class(m).momentum_pairs is not SSLMethod.momentum_pairs]
STATE_METHODS = ["moco_v2", "nnclr", "dino", "swav", "vqvae"]  # methods whose training state lives in buffers


def state_buffers(method):
    """Buffers that hold method state (queues, centers, pointers), not BatchNorm statistics."""
    return {n: b for n, b in method.named_buffers()
            if not any(k in n for k in ("running_", "num_batches_tracked", "views."))}


@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_targets_follow_and_stay_frozen(name):
    cfg = tiny_cfg(name)
    L.seed_everything(0)
    method, dm = build(cfg)
    pairs = method.momentum_pairs()
    start = [[p.clone() for p in target.parameters()] for _, target in pairs]
    fit(method, dm, steps=2)
    for (_, target), before in zip(pairs, start, strict=True):
        assert all(not p.requires_grad for p in target.parameters()), "the target must stay frozen"
        assert all(p.grad is None for p in target.parameters())
        moved = [not torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True)]
        assert any(moved), "the target did not follow the online network"
    # one more EMA step is exactly the documented mix of target and online weights
    m = 0.9
    online, target = pairs[0]
    before = [p.clone() for p in target.parameters()]
    update_momentum(online, target, m)
    for b, o, t in zip(before, online.parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(t, m * b + (1 - m) * o)


def test_ema_updates_once_per_optimizer_step_under_accumulation():
    cfg = tiny_cfg("moco_v2")
    L.seed_everything(0)
    method, dm = build(cfg)
    calls = []
    original = base.update_momentum
    base.update_momentum = lambda *a: (calls.append(1), original(*a))
    try:
        fit(method, dm, steps=3, accumulate_grad_batches=2)  # 6 micro-batches, 3 optimizer steps
    finally:
        base.update_momentum = original
    assert len(calls) == 3 * len(method.momentum_pairs())


@pytest.mark.parametrize("name", STATE_METHODS)
def test_state_buffers_change_and_survive_a_checkpoint(name, tmp_path):
    cfg = tiny_cfg(name, *(["method.queue_size=64", "method.queue_start_epoch=0"] if name == "swav" else []))
    L.seed_everything(0)
    method, dm = build(cfg)
    initial = {n: b.clone() for n, b in state_buffers(method).items()}
    assert initial, f"{name} has no state buffers"
    trainer = fit(method, dm, steps=3)
    changed = [n for n, b in state_buffers(method).items() if not torch.equal(b, initial[n])]
    assert changed, "training did not update the method's state"
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    L.seed_everything(1)
    fresh, _ = build(cfg)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    for n, b in state_buffers(method).items():
        assert torch.equal(state_buffers(fresh)[n], b), n


def test_queue_holds_the_latest_keys_in_order():
    method, _ = trained("moco_v2", 3)
    q = method.queue
    assert int(q.ptr) == 3 * 16 % 64 and int(q.filled) == 48
    torch.testing.assert_close(q.features[:48].norm(dim=1), torch.ones(48))  # normalised keys were written


def test_queue_follows_its_position_on_the_host_and_rereads_it_after_loading():
    from src.nn.queue import FeatureQueue

    q, other = FeatureQueue(8, 2), FeatureQueue(8, 2)
    q.push(torch.ones(4, 2), gather=False)
    other.push(torch.full((4, 2), 2.0), gather=False)
    other.push(torch.full((4, 2), 3.0), gather=False)
    assert q.written().shape[0] == 4 and not q.is_full()
    q.load_state_dict(other.state_dict())  # ptr 0, filled 8: the host copy must follow
    assert q.is_full()
    q.push(torch.full((4, 2), 5.0), gather=False)
    assert q.features[:, 0].tolist() == [5.0] * 4 + [3.0] * 4 and int(q.ptr) == 4
    q.ptr.fill_(0)  # written from outside (a skipped step restores the buffers)
    q.buffers_restored()
    q.push(torch.full((4, 2), 7.0), gather=False)
    assert q.features[:4, 0].tolist() == [7.0] * 4


def test_dino_freezes_the_last_layer_in_epoch_zero_and_moves_its_center():
    cfg = tiny_cfg("dino")
    L.seed_everything(0)
    method, dm = build(cfg)
    last = method.head.last_layer.weight_v.clone()
    mlp = method.head.mlp[0].weight.clone()
    fit(method, dm, steps=2)
    assert torch.equal(method.head.last_layer.weight_v, last), "the last layer must not move in epoch 0"
    assert not torch.equal(method.head.mlp[0].weight, mlp)
    assert method.center.abs().sum() > 0
    assert not method.head.last_layer.weight_g.requires_grad  # norm_last_layer: g fixed at 1


def test_dino_weight_decay_follows_its_cosine_schedule():
    _, trainer = trained("dino", 3)
    decay, no_decay = trainer.optimizers[0].param_groups
    assert 0.04 < decay["weight_decay"] <= 0.4 and no_decay["weight_decay"] == 0.0


def test_swav_prototypes_are_normalised_and_frozen_at_first():
    cfg = tiny_cfg("swav", "method.freeze_prototypes_steps=100")
    L.seed_everything(0)
    method, dm = build(cfg)
    start = F.normalize(method.prototypes.weight.detach().clone(), dim=1)
    fit(method, dm, steps=2)
    torch.testing.assert_close(method.prototypes.weight.detach(), start)  # only normalised, no gradient step
    cfg = tiny_cfg("swav", "method.freeze_prototypes_steps=0")
    L.seed_everything(0)
    method, dm = build(cfg)
    fit(method, dm, steps=2)
    assert not torch.allclose(method.prototypes.weight.detach(), start)


def test_simsiam_predictor_keeps_a_fixed_learning_rate():
    method, trainer = trained("simsiam", 3)
    groups = trainer.optimizers[0].param_groups
    fixed = [g for g in groups if g.get("fixed_lr")]
    others = [g for g in groups if not g.get("fixed_lr")]
    assert len(fixed) == 1 and {id(p) for g in fixed for p in g["params"]} == {id(p) for p in method.predictor.parameters()}
    assert all(g["lr"] == method.scaled_lr for g in fixed) and all(g["lr"] < method.scaled_lr for g in others)


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_multicrop_recipe_works_with_two_view_methods(name):
    cfg = tiny_cfg(name, "views=multicrop")
    L.seed_everything(0)
    method, dm = build(cfg)
    views = method.views(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    assert [v.shape[-1] for v in views] == [16, 16] + [7] * 6 and num_global_views(views) == 2
    out = method.training_loss(views)
    loss = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(loss)
    loss.backward()


def test_embed_runs_the_backbone_once_per_size_and_the_head_once():
    cfg = tiny_cfg("dino")
    method, _ = build(cfg)
    calls = []
    method.backbone.register_forward_hook(lambda m, i, o: calls.append(("backbone", i[0].shape[0])))
    method.head.register_forward_hook(lambda m, i, o: calls.append(("head", i[0].shape[0])))
    views = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 7, 7)] * 3
    out = method.embed(views, head=method.head)
    assert calls == [("backbone", 8), ("backbone", 12), ("head", 20)]
    assert len(out) == 5 and all(o.shape == (4, 32) for o in out)
    assert view_pairs(2, 4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]


def test_param_groups_exclude_norms_and_biases_from_weight_decay():
    cfg = tiny_cfg("simclr")
    method, _ = build(cfg)
    decay, no_decay = method.param_groups()
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(1 for p in method.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n


def test_barlow_twins_biases_and_norms_get_their_own_learning_rate():
    _, trainer = trained("barlow_twins", 1)
    weights, biases = trainer.optimizers[0].param_groups
    assert biases["initial_lr"] == pytest.approx(0.024 * weights["initial_lr"])


def test_swav_queue_joins_sinkhorn_once_full(monkeypatch):
    seen = []
    original = swav_module.swav_loss
    monkeypatch.setattr(swav_module, "swav_loss", lambda *a, **k: (seen.append(k["queue_scores"]), original(*a, **k))[1])
    method, _ = trained("swav", 5, "method.queue_size=64", "method.queue_start_epoch=0")
    assert [q is None for q in seen] == [True] * 4 + [False]  # 4 batches of 16 fill the queue of 64
    assert [tuple(q.shape) for q in seen[4]] == [(64, 16), (64, 16)]  # Q x prototypes, per global crop
    assert method.use_queue()


# the methods whose step computes plain backbone features of a training view (the online probe's train_view input)
PLAIN_VIEW_FEATURES = {"barlow_twins", "byol", "clip", "dino", "moco", "moco_v1", "moco_v2", "moco_v3", "nnclr",
                       "simclr", "simsiam", "swav", "vicreg"}


@pytest.mark.parametrize("name", METHODS)
def test_step_keeps_the_first_views_detached_features(name):
    """embed keeps the online backbone's features of views[0] (what OnlineLinearProbe(features=train_view) reads);
    teachers' passes do not overwrite them; methods on rotated/tiled/Lab/masked inputs keep none."""
    method, dm = build(tiny_cfg(name))
    dm.setup("fit")
    images = torch.stack([dm.pretrain[i][0] for i in range(16)])
    torch.manual_seed(0)
    batch = {"views": method.views(images), "image": images}
    if getattr(method, "tokenizer", None) is not None and len(dm.pretrain[0]) > 2:
        batch["text"] = method.tokenizer([dm.pretrain[i][2] for i in range(16)])
    method.eval()  # BatchNorm on running statistics: the features of a view do not depend on what it is batched with
    with torch.no_grad():
        method.batch_loss(batch)
        expected = method(batch["views"][0])
    feats = method.first_view_features
    if name not in PLAIN_VIEW_FEATURES:
        assert feats is None
        return
    assert feats is not None and feats.shape == (16, method.feature_dim)
    torch.testing.assert_close(feats, expected)
    method.train()
    method.batch_loss(batch)  # with gradients: the kept features are cut from the graph
    assert method.first_view_features.shape == (16, method.feature_dim) and not method.first_view_features.requires_grad


def test_convnet_pool_grid_keeps_the_layout_and_dense_methods_still_build():
    """pool_grid=g: g x g region means of the last feature map, concatenated (out_dim = channels * g^2); g=1 is the
    global average pool of before. Dense heads read the map's channels, not the pooled width."""
    from src.backbones.convnet import ConvNet

    torch.manual_seed(0)
    plain, grid = ConvNet(1, 8, 2), ConvNet(1, 8, 2, pool_grid=2)
    grid.load_state_dict(plain.state_dict())
    assert (plain.out_dim, grid.out_dim, grid.channels) == (16, 64, 16)
    x = torch.randn(3, 1, 16, 16)
    fmap = plain.feature_map(x)  # 3 x 16 x 8 x 8
    torch.testing.assert_close(plain(x), fmap.mean((2, 3)))
    regions = fmap.unflatten(2, (2, 4)).unflatten(4, (2, 4)).mean((3, 5))  # 3 x 16 x 2 x 2
    torch.testing.assert_close(grid(x), regions.flatten(1))
    with pytest.raises(ValueError, match="pool_grid"):
        ConvNet(1, 8, 2, pool_grid=0)
    for name in ("simclr", "inpainting"):
        method, _ = build(tiny_cfg(name, "backbone.pool_grid=2"))
        assert method.feature_dim == 64 * (2 if name == "split_brain" else 1)
        views = method.views(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8))
        out = method.training_loss(views)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out)
