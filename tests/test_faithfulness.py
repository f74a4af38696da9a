"""Construction details checked against the authors' reference code (docs/faithfulness.md): what the teachers
run, which layers have bias or BatchNorm, initialisation, shuffled BatchNorm, crop sampling, per-process state,
the codebook's restarts and the fine-tuning parameter groups."""

import lightning as L
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from torch import nn

from src.methods.base import SSLMethod
from tests.helpers import METHODS, ROOT, tiny_cfg


def build(cfg):
    return instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))



def method_classes() -> dict[str, type]:
    """The class of every conf/method/*.yaml that names one (aliases such as moco.yaml name none), read from the
    files themselves: composing each config would cost a second apiece."""
    out = {}
    for name in METHODS:
        target = OmegaConf.load(ROOT / "conf" / "method" / f"{name}.yaml").get("_target_")
        if target:
            out[name] = get_class(target)
    return out


# every method with a momentum copy, found from its class (a method added later is checked the day it appears)
MOMENTUM_METHODS = [m for m, c in method_classes().items() if c.momentum_pairs is not SSLMethod.momentum_pairs]


def test_the_momentum_methods_are_found():
    assert {"moco_v1", "moco_v2", "moco_v3", "byol", "dino"} <= set(MOMENTUM_METHODS)


@pytest.mark.parametrize("name", MOMENTUM_METHODS)
def test_teachers_run_without_stochastic_depth(name):
    """DINO builds its teacher without drop path (main_dino.py: drop_path_rate goes to the student only), MoCo v3's
    and BYOL's momentum encoders have none: two training-mode teacher passes on one batch give the same output,
    while the student (drop path 0.2) does not. The target's BatchNorm stays in training mode. Then evaluation reads
    the backbone the reference evaluates (the same build: one composition per method)."""
    L.seed_everything(0)
    method = build(tiny_cfg(name, "backbone.drop_path_rate=0.2", vit=True))
    method.train()
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(method.backbone(x), method.backbone(x)), "the student must keep its drop path"
    pairs = method.momentum_pairs()
    backbones = [t for o, t in pairs if o is method.backbone]
    assert backbones, f"{name}: no momentum copy of the backbone among momentum_pairs()"
    with torch.no_grad():
        for target in backbones:
            assert target.training
            torch.testing.assert_close(target(x), target(x), rtol=0, atol=0)
    for _, target in pairs:  # heads too: nothing random left anywhere in a teacher
        for m in target.modules():
            assert getattr(m, "drop_prob", 0.0) == 0.0, m
            assert not isinstance(m, nn.modules.dropout._DropoutNd) or m.p == 0.0, m
    evaluation_reads_the_backbone_the_reference_evaluates(name, method, backbones[0], x)


# the references that evaluate (and release) the momentum teacher: DINO's, iBOT's and DINOv2's eval scripts read
# --checkpoint_key teacher; MoCo's and BYOL's evaluate the online encoder
TEACHER_EVALUATED = {"dino", "ibot", "dinov2"}


def evaluation_reads_the_backbone_the_reference_evaluates(name, method, teacher, x):
    """What every protocol measures (``method(x)``, fine-tuning's network, segment's attention) is the teacher for
    the DINO family and the online backbone otherwise; ``method.evaluate=student`` switches the DINO family."""
    from src.protocols.segment import attention_source

    method.eval()
    with torch.no_grad():  # student and teacher apart, as after training
        for p in method.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    want = teacher if name in TEACHER_EVALUATED else method.backbone
    assert method.evaluated_backbone is want and method.feature_network is want
    assert attention_source(method) is want
    with torch.no_grad():
        torch.testing.assert_close(method(x), want(x), rtol=0, atol=0)
        torch.testing.assert_close(method.online(x), method.backbone(x), rtol=0, atol=0)  # what training uses
        assert want is method.backbone or not torch.allclose(method(x), method.online(x))
    if name in TEACHER_EVALUATED:
        method.hparams.evaluate = "student"
        assert method.evaluated_backbone is method.backbone and attention_source(method) is method.backbone


# ---- MoCo v3 (facebookresearch/moco-v3: moco/builder.py, vits.py, main_moco.py) ------------------------------------


def test_moco_v3_heads_follow_the_reference_builder():
    """_build_mlp: no linear has a bias; the projector ends in BatchNorm1d(affine=False) (3 layers on a ViT, 2 on a
    ResNet); the predictor ends in BatchNorm1d(affine=False) on a ViT only (MoCo_ViT passes last_bn=True)."""
    for vit, layers in ((True, 3), (False, 2)):
        method = build(tiny_cfg("moco_v3", vit=vit))
        for mlp in (method.projector, method.predictor):
            assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear)), mlp
        assert sum(isinstance(m, nn.Linear) for m in method.projector) == layers
        for mlp, ends_in_bn in ((method.projector, True), (method.predictor, vit)):
            last = mlp[-1]
            assert isinstance(last, nn.BatchNorm1d) == ends_in_bn, (vit, mlp)
            assert not ends_in_bn or not last.affine


def test_moco_v3_vit_starts_from_the_reference_initialisation():
    """vits.py: the frozen patch projection uniform in +-sqrt(6 / (3 p^2 + D)), biases 0, every linear
    Xavier-uniform with q, k, v treated as three matrices, the CLS token N(0, 1e-6)."""
    torch.manual_seed(0)
    method = build(tiny_cfg("moco_v3", "backbone.embed_dim=64", "backbone.freeze_patch_embed=true", vit=True))
    net = method.backbone.net
    proj = net.patch_embed.proj.weight  # 64 x 3 x 4 x 4
    bound = (6 / (3 * 4 * 4 + 64)) ** 0.5
    assert not proj.requires_grad
    assert proj.abs().max() <= bound and proj.abs().max() > 0.95 * bound  # uniform over the whole range
    assert abs(proj.std().item() - bound / 3**0.5) < 0.1 * bound  # std of U(-b, b)
    assert net.patch_embed.proj.bias.abs().max() == 0
    qkv = net.blocks[0].attn.qkv.weight  # 192 x 64
    qkv_bound = (6 / (64 + 64)) ** 0.5  # each of q, k, v is 64 x 64 (not 192 x 64: bound 0.153)
    assert 0.95 * qkv_bound < qkv.abs().max() <= qkv_bound
    fc1 = net.blocks[0].mlp.fc1.weight  # 256 x 64
    fc1_bound = (6 / (256 + 64)) ** 0.5
    assert 0.95 * fc1_bound < fc1.abs().max() <= fc1_bound
    assert all(m.bias.abs().max() == 0 for m in net.modules() if isinstance(m, nn.Linear))
    assert net.cls_token.abs().max() < 1e-5
    # the momentum encoder starts as a copy of it
    torch.testing.assert_close(method.backbone_k.net.patch_embed.proj.weight, proj, rtol=0, atol=0)


def test_moco_v3_leaves_a_weights_file_alone(tmp_path):
    from src.backbones.vit import ViT

    torch.manual_seed(3)
    source = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "vit.pth"
    torch.save(source.net.state_dict(), path)
    method = build(tiny_cfg("moco_v3", f"backbone.pretrained={path}", vit=True))
    torch.testing.assert_close(method.backbone.net.blocks[0].attn.qkv.weight, source.net.blocks[0].attn.qkv.weight)


def test_moco_v3_weight_decay_groups_follow_the_optimizer():
    """main_moco.py gives AdamW every parameter (weight decay on all of them); its LARS skips 1-D parameters."""
    import lightning as L

    for optimizer, groups in (("torch.optim.AdamW", 1), ("src.nn.optim.LARS", 2)):
        L.seed_everything(0)
        method = build(tiny_cfg("moco_v3", f"method.optimizer._target_={optimizer}", vit=True))
        found = method.param_groups()
        assert len(found) == groups
        assert sum(len(g["params"]) for g in found) == sum(p.requires_grad for p in method.parameters())


# ---- MoCo v1/v2 shuffled BatchNorm (facebookresearch/moco: moco/builder.py, colab demo's SplitBatchNorm) ---------
def dependence(fn, x: torch.Tensor, seed: int = 0) -> list[set[int]]:
    """For each row i of fn(x), the rows j of x whose change changes it (batch statistics couple rows). fn runs under
    the same seed each time, so a shuffle draws the same permutation."""
    torch.manual_seed(seed)
    base = fn(x)
    deps = [set() for _ in range(x.shape[0])]
    for j in range(x.shape[0]):
        y = x.clone()
        y[j] += torch.randn_like(y[j])
        torch.manual_seed(seed)
        moved = (fn(y) - base).abs().flatten(1).amax(1) > 1e-6
        for i in moved.nonzero().flatten().tolist():
            deps[i].add(j)
    return deps


def test_moco_key_and_query_are_normalised_with_different_images_on_one_device():
    """MoCo sec. 3.3: the batch statistics of a query and of its positive key must come from different subsets.
    One device: the key batch is permuted and normalised in groups (bn_splits=4: groups of 4 of 16), the query with
    its whole batch; a key depends on the 3 other images of its random group only."""
    torch.manual_seed(0)
    method = build(tiny_cfg("moco_v1", "method.bn_splits=4")).train()
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        keys = dependence(method.keys, x)
        queries = dependence(lambda v: method.projector(method.backbone(v)), x)
    assert all(len(d) == 4 and i in d for i, d in enumerate(keys)), keys
    assert all(q == set(range(16)) for q in queries)
    assert all(k != q for k, q in zip(keys, queries, strict=True))
    assert any(keys[i] != set(range(i // 4 * 4, i // 4 * 4 + 4)) for i in range(16)), "groups must be shuffled"
    assert len({frozenset(d) for d in keys}) == 4  # a partition into 4 groups
    # the keys themselves are the key encoder's output, unpermuted: each equals the encoder on its own group
    from src.nn.ema import SplitBatchNorm

    torch.manual_seed(0)
    k = method.keys(x)
    for m in method.modules():
        if isinstance(m, SplitBatchNorm):
            m.splits = 1
    for group in {frozenset(d) for d in keys}:
        idx = sorted(group)
        alone = method.keys(x[idx])  # the 4 images as one group, in any order
        torch.testing.assert_close(k[idx], alone, rtol=1e-4, atol=1e-5)


def test_moco_key_encoder_is_never_synchronised():
    """hardware=ddp converts BatchNorm to SyncBatchNorm; the reference runs per-GPU BatchNorm on the shuffled keys,
    so the key encoder keeps its own (per process) normalisation while the query encoder is converted."""
    method = build(tiny_cfg("moco_v2"))
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.backbone.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.backbone_k.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.projector_k.modules())


def test_moco_v2_head_is_the_references_mlp():
    """moco/builder.py (mlp=True): Linear(2048, 2048) - ReLU - Linear(2048, 128), both with bias, no BatchNorm;
    v1: one biased Linear."""
    v2, v1 = build(tiny_cfg("moco_v2")), build(tiny_cfg("moco_v1"))
    assert [type(m) for m in v2.projector] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(m.bias is not None for m in v2.projector if isinstance(m, nn.Linear))
    assert [type(m) for m in v1.projector] == [nn.Linear] and v1.projector[0].bias is not None
    assert len(v2.param_groups()) == 1  # SGD with weight decay on every parameter (main_moco.py)


# ---- SwAV (facebookresearch/swav main_swav.py) ----------------------------------------------------------------------
def test_swav_queue_starts_at_its_epoch():
    """epoch_queue_starts: the queue is created (and filled) from that epoch on, not filled from epoch 0."""
    L.seed_everything(0)
    cfg = tiny_cfg("swav", "method.queue_size=64", "method.queue_start_epoch=1")
    method = build(cfg)
    filled = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            filled.append(int(pl_module.queues[0].filled))

    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(method, datamodule=instantiate(cfg.data))
    assert filled == [0, 32]  # nothing in epoch 0; two batches of 16 in epoch 1
    assert len(method.param_groups()) == 1  # LARC adapts and decays every parameter


# ---- fine-tuning (MAE main_finetune.py + util/lr_decay.py, DeiT) ---------------------------------------------------
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_finetune_trains_everything_and_spares_tokens_from_weight_decay(pos_embed):
    """MAE's param_groups_lrd: no weight decay on 1-D parameters nor on timm's no_weight_decay() names (cls_token,
    pos_embed); what pre-training froze (MoCo v3's patch projection, sin-cos positions) is trained when fine-tuning."""
    from src.nn.optim import finetune_param_groups

    backbone = instantiate(tiny_cfg("moco_v3", f"backbone.pos_embed={pos_embed}", "backbone.freeze_patch_embed=true",
                                    vit=True).backbone)
    assert not backbone.net.patch_embed.proj.weight.requires_grad
    head = nn.Linear(backbone.out_dim, 10)
    groups = finetune_param_groups(backbone, head, 0.05, 0.75)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(backbone.named_parameters())
    assert len(decay) == len(named) + 2 and all(p.requires_grad for p in named.values())  # + the head's weight, bias
    for name in ("net.cls_token", "net.pos_embed", "net.patch_embed.proj.bias", "net.norm.weight"):
        assert decay[id(named[name])] == 0.0, name
    for name in ("net.patch_embed.proj.weight", "net.blocks.0.attn.qkv.weight"):
        assert decay[id(named[name])] == 0.05, name
    assert decay[id(head.weight)] == 0.05 and decay[id(head.bias)] == 0.0


# ---- heads, loss scales, BatchNorm per view, initialisation (item 8 of the audit) ----------------------------------
def test_heads_follow_the_references():
    """SimCLR: bias-free linears, output BatchNorm with a scale and no shift (model_util.projection_head); BYOL
    (networks.MLP), Barlow Twins and VICReg (Projector): no bias in the last linear."""
    simclr = build(tiny_cfg("simclr"))
    last = simclr.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and last.weight is not None and last.bias is None
    assert all(m.bias is None for m in simclr.projector if isinstance(m, nn.Linear))
    byol, barlow, vicreg = (build(tiny_cfg(n)) for n in ("byol", "barlow_twins", "vicreg"))
    for mlp in (byol.projector, byol.predictor, barlow.projector, vicreg.projector):
        assert isinstance(mlp[-1], nn.Linear) and mlp[-1].bias is None
    assert barlow.lambd == 0.0051  # main.py's default


def test_simclr_and_byol_losses_sum_both_directions():
    """SimCLR: loss_a + loss_b (objective.add_contrastive_loss); BYOL: loss(1 -> 2) + loss(2 -> 1)."""
    from src.nn.losses import negative_cosine, nt_xent

    torch.manual_seed(0)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    simclr = build(tiny_cfg("simclr")).train()
    z = simclr.embed(views, head=simclr.projector)
    torch.testing.assert_close(simclr.training_loss(views), 2 * nt_xent(z[0], z[1], 0.1))
    byol = build(tiny_cfg("byol")).train()
    q = [byol.predictor(byol.projector(byol.backbone(v))) for v in views]
    with torch.no_grad():
        t = [byol.projector_t(byol.backbone_t(v)) for v in views]
    mse = lambda a, b: ((nn.functional.normalize(a, dim=1) - nn.functional.normalize(b, dim=1)) ** 2).sum(1).mean()  # noqa: E731
    reference = mse(q[0], t[1]) + mse(q[1], t[0])
    torch.testing.assert_close(byol.training_loss(views), reference)
    torch.testing.assert_close(reference, 4 + 2 * negative_cosine(q[0], t[1]) + 2 * negative_cosine(q[1], t[0]))


PER_VIEW = ["byol", "simsiam", "barlow_twins", "vicreg", "moco_v3"]


@pytest.mark.parametrize("name", PER_VIEW)
def test_each_view_has_its_own_batchnorm_statistics(name):
    """BYOL, SimSiam, Barlow Twins, VICReg and MoCo v3 forward each view alone (two calls per network): no backbone
    or head ever sees the two views in one batch."""
    method = build(tiny_cfg(name)).train()
    sizes = []
    nets = [m for m in method.children() if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    for net in nets:
        net.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    method.training_loss(views)
    assert sizes and set(sizes) == {8}, sizes


def test_resnets_start_with_zero_init_residual(monkeypatch):
    """torchvision's zero_init_residual=True (SimSiam, Barlow Twins, VICReg, MoCo v3), SimCLR's init_zero, BYOL's
    scale_init=zeros: each residual block's last BatchNorm scale starts at 0 (not over a weights file); DINO, SwAV
    and MoCo v1/v2 keep torchvision's default."""
    import importlib

    from src.backbones.resnet import ResNet, zero_init_residual

    resnet = ResNet("resnet18", cifar_stem=True)
    blocks = [m for m in resnet.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 8 and all(b.bn2.weight.abs().sum() > 0 for b in blocks)
    zero_init_residual(resnet)
    assert all(b.bn2.weight.abs().sum() == 0 and b.bn1.weight.abs().sum() > 0 for b in blocks)
    for name, zero in (("simclr", True), ("byol", True), ("simsiam", True), ("barlow_twins", True),
                       ("vicreg", True), ("moco_v3", True), ("moco_v2", False), ("dino", False), ("swav", False)):
        cfg = tiny_cfg(name, vit=False)
        module = importlib.import_module(cfg.method._target_.rsplit(".", 1)[0])
        called = []
        if hasattr(module, "init_residual_to_zero"):
            monkeypatch.setattr(module, "init_residual_to_zero", called.append)
        method = build(cfg)
        assert (called == [method.backbone]) == zero, name


def test_dino_teacher_temperature_is_an_epoch_linspace():
    """main_dino.py: teacher_temp_schedule = linspace(warmup, final, W) per epoch, then final: epoch W - 1 already
    has the final temperature (not epoch W)."""
    from types import SimpleNamespace

    method = build(tiny_cfg("dino", "method.warmup_teacher_temp=0.04", "method.teacher_temp=0.07",
                            "method.warmup_teacher_temp_epochs=3"))
    temps = []
    for epoch in range(5):
        method._trainer = SimpleNamespace(max_epochs=10, current_epoch=epoch)
        temps.append(method.teacher_temperature())
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])


def test_dino_last_layer_starts_as_an_nn_linear():
    """DINOHead wraps a fresh nn.Linear in weight_norm after its truncated-normal init of the MLP: V ~ U(+-1/sqrt(d))."""
    from src.nn.heads import NormalizedLinear

    torch.manual_seed(0)
    layer = NormalizedLinear(256, 4096)
    bound = 1 / 256**0.5
    assert layer.weight_v.abs().max() <= bound and layer.weight_v.abs().max() > 0.99 * bound


def test_mae_encoder_has_fixed_sincos_positions_and_xavier_init():
    """models_mae.py: the encoder's pos_embed is 2-D sin-cos and frozen, linears Xavier-uniform with zero biases,
    the patch projection Xavier as a D x (C p^2) matrix, the CLS token N(0, 0.02); the kept count is truncated."""
    from src.nn.masks import num_visible
    from src.nn.tokens import sincos_2d

    torch.manual_seed(0)
    method = build(tiny_cfg("mae", "backbone.embed_dim=64", "backbone.pos_embed=learned"))
    net = method.backbone.net
    assert not net.pos_embed.requires_grad
    torch.testing.assert_close(net.pos_embed[0, 1:], sincos_2d(method.backbone.base_grid, 64))
    fc1 = net.blocks[0].mlp.fc1.weight  # 256 x 64
    assert 0.95 * (6 / 320) ** 0.5 < fc1.abs().max() <= (6 / 320) ** 0.5
    assert net.blocks[0].mlp.fc1.bias.abs().max() == 0
    proj = net.patch_embed.proj.weight  # 64 x 3 x 4 x 4
    assert 0.95 * (6 / (48 + 64)) ** 0.5 < proj.abs().max() <= (6 / (48 + 64)) ** 0.5
    assert 0.01 < net.cls_token.std() < 0.04
    assert num_visible(49, 0.6) == 19 and num_visible(196, 0.75) == 49  # int(19.6): truncated as len_keep
