"""iBOT and DINOv2: their losses against naive loops, 2 gloo processes against 1 on the same global batch (Sinkhorn-
Knopp, centring, KoLeo, the whole step), teachers without drop path, the ViT's register tokens and DINOv2's weight
files, the head warm-up on such a file, layer-wise lr decay, and each bad setting as one line."""

import functools
import math
import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate

from src.backbones.vit import ViT
from src.config.compose import compose
from src.config.rules import config_problems
from src.methods.dinov2 import vit_layer
from src.nn.knn import knn_top1
from src.nn.losses import dino_loss, sinkhorn
from src.nn.self_distillation import (
    dinov2_masks,
    distillation_loss,
    ibot_masks,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_softmax,
    update_center_,
)
from src.protocols.features import extract_features
from src.utils.checkpointing import load_checkpoint
from src.utils.errors import UserError
from tests.helpers import averaged_over_ranks, tiny_cfg, two_rank_results


# ---- losses against naive loops -------------------------------------------------------------------------
def naive_sinkhorn(t, temp, iterations):
    """DINOv2's sinkhorn_knopp_teacher, element by element."""
    n, k = len(t), len(t[0])
    q = [[math.exp(t[i][j] / temp) for i in range(n)] for j in range(k)]  # K x N
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        q = [[v / sum(row) / k for v in row] for row in q]
        cols = [sum(q[j][i] for j in range(k)) for i in range(n)]
        q = [[q[j][i] / cols[i] / n for i in range(n)] for j in range(k)]
    return torch.tensor([[q[j][i] * n for j in range(k)] for i in range(n)])


def test_sinkhorn_knopp_follows_the_reference_loop_and_equals_swavs_codes():
    t = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    q = sinkhorn_knopp(t, 0.1, 3)
    torch.testing.assert_close(q, naive_sinkhorn(t.tolist(), 0.1, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(6))
    torch.testing.assert_close(q, sinkhorn(t, epsilon=0.1, iterations=3))  # SwAV's, whose rows all ranks hold alike


def test_distillation_loss_is_dinos_loss_with_centred_targets():
    g = torch.Generator().manual_seed(1)
    student, teacher = [torch.randn(4, 7, generator=g) for _ in range(5)], [torch.randn(4, 7, generator=g) for _ in range(2)]
    center = torch.randn(1, 7, generator=g)
    q = [teacher_softmax(t, center, 0.04) for t in teacher]
    torch.testing.assert_close(distillation_loss(student, q, 0.1), dino_loss(student, teacher, center, 0.1, 0.04))
    naive = sum(-(q[i][b] * F.log_softmax(student[v][b] / 0.1, dim=0)).sum()
                for i in range(2) for v in range(5) if v != i for b in range(4)) / (8 * 4)
    torch.testing.assert_close(distillation_loss(student, q, 0.1), naive)


def test_ibot_patch_loss_normalises_each_image_by_its_masked_count():
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(3, 6, dtype=torch.bool)
    masks[0, [1, 2, 5]] = masks[2, 4] = True  # image 1 has no mask: it counts in N with 0
    s, t = torch.randn(4, 5, generator=g), F.softmax(torch.randn(4, 5, generator=g), dim=1)
    rows, naive = masks.nonzero().tolist(), 0.0
    for n in range(3):
        mine = [r for r, (img, _) in enumerate(rows) if img == n]
        ce = [-(t[r] * F.log_softmax(s[r] / 0.1, dim=0)).sum() for r in mine]
        naive += sum(ce) / max(len(mine), 1)
    torch.testing.assert_close(ibot_patch_loss(s, t, masks, 0.1), torch.as_tensor(naive / 3))


def test_koleo_loss_is_the_mean_log_distance_to_the_nearest_other_point():
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(3))
    u = F.normalize(x, dim=1)
    naive = -sum(math.log(min(float((u[i] - u[j] + 1e-8).norm()) for j in range(7) if j != i) + 1e-8)
                 for i in range(7)) / 7
    torch.testing.assert_close(koleo_loss(x), torch.tensor(naive), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(x[:1])


def test_center_moves_to_the_mean_of_any_number_of_rows():
    center, rows = torch.ones(1, 1, 3), torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    update_center_(center, rows, 0.9)
    torch.testing.assert_close(center, 0.9 + 0.1 * torch.tensor([[[2.0, 3.0, 4.0]]]))
    update_center_(center, rows[:0], 0.9)  # no rows anywhere: unchanged
    torch.testing.assert_close(center, 0.9 + 0.1 * torch.tensor([[[2.0, 3.0, 4.0]]]))


def test_masks_follow_each_reference():
    torch.manual_seed(0)
    grid, size = (6, 6), 36
    m = dinov2_masks(40, grid, 0.5, (0.1, 0.5))
    counts = sorted(int(c) for c in m.sum(dim=1))
    assert counts[:20] == [0] * 20 and all(int(0.1 * size) <= c <= int(0.5 * size) for c in counts[20:])
    slices = torch.linspace(0.1, 0.5, 21)  # DINOv2: the i-th masked crop draws its ratio from the i-th slice
    assert counts[20:] == sorted(counts[20:]) and counts[20] <= int(size * slices[1]) and counts[-1] >= int(size * slices[19])
    m = ibot_masks(400, grid, 0.5, (0.1, 0.5))
    share = float((m.sum(dim=1) > 0).float().mean())
    assert 0.4 < share < 0.6 and int(m.sum(dim=1).max()) <= int(0.5 * size)  # iBOT: each crop on its own
    torch.manual_seed(5)  # draws come from torch's RNG: reproducible under a seed
    a = ibot_masks(8, grid)
    torch.manual_seed(5)
    assert torch.equal(a, ibot_masks(8, grid))


# ---- 2 processes against 1 ---------------------------------------------------------------------------------
GLOBAL, SIZE = 8, 16
METHODS = {"dinov2": (), "dinov2_sk": ("method.centering=sinkhorn_knopp", "method.shared_head=false"),
           "ibot_sep": ("method.shared_head=false",)}


@functools.cache
def configs() -> dict:
    return {key: tiny_cfg(key.split("_")[0], *extra, "method.warmup_teacher_temp_epochs=0")
            for key, extra in METHODS.items()}


def build(cfg):
    torch.manual_seed(0)
    return instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):  # 2 global crops of 16 px, 2 local of 8; masks of the global crops (crop-major rows)
        views = [torch.randn(GLOBAL, 3, 16, 16, generator=g) for _ in range(2)] + \
                [torch.randn(GLOBAL, 3, 8, 8, generator=g) for _ in range(2)]
        masks = torch.rand(2 * GLOBAL, 16, generator=g) < 0.4
        masks[::3] = False  # some crops unmasked
        out.append((views, masks))
    return out


def local(batch, rank, world):
    views, masks = batch
    n = GLOBAL // world
    rows = torch.cat([torch.arange(rank * n, (rank + 1) * n) + c * GLOBAL for c in range(2)])
    return [v[rank * n:(rank + 1) * n] for v in views], masks[rows]


def steps(model, parts):
    out = []
    for views, masks in parts:
        model.draw_masks = lambda n, grid, device, m=masks: m
        model.zero_grad()
        loss, logs = model.training_loss(views)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    return out


def _worker(rank, world, port, out_dir, cfgs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {}
        for key, cfg in cfgs.items():
            model = build(cfg)
            result[key] = averaged_over_ranks(steps(model, [local(b, rank, world) for b in batches()]))
            result[key + "_state"] = {k: b.clone() for k, b in model.named_buffers() if "center" in k}
        t = torch.randn(11, 6, generator=torch.Generator().manual_seed(4))
        mine = t[:3] if rank == 0 else t[3:]  # uneven rows, as the masked patches of two processes
        result["sk"] = sinkhorn_knopp(mine, 0.07, 3)
        center = torch.zeros(1, 1, 6)
        update_center_(center, mine, 0.5)
        result["center"] = center
        x = torch.randn(GLOBAL, 5, generator=torch.Generator().manual_seed(5)).requires_grad_()
        n = GLOBAL // world
        part = x[rank * n:(rank + 1) * n].detach().requires_grad_()
        loss = koleo_loss(part, gather=True)
        loss.backward()
        result["koleo"] = (loss.detach(), part.grad)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return two_rank_results(_worker, tmp_path_factory.mktemp("ddp"), configs())


@pytest.mark.parametrize("key", METHODS)
def test_two_processes_give_the_loss_gradients_and_centres_of_one(two_ranks, key):
    model = build(configs()[key])
    reference = steps(model, batches())
    for r in two_ranks:
        for (loss, grads), (ref_loss, ref_grads) in zip(r[key], reference, strict=True):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            assert grads.keys() == ref_grads.keys() and any("mask_token" in k for k in grads)
            scale = max(float(g.abs().max()) for g in ref_grads.values())
            for k in grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6 * scale, msg=k)
        for k, b in model.named_buffers():
            if "center" in k:
                torch.testing.assert_close(r[key + "_state"][k], b, rtol=1e-5, atol=1e-7)


def test_sinkhorn_knopp_centre_and_koleo_use_every_process(two_ranks):
    t = torch.randn(11, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(torch.cat([r["sk"] for r in two_ranks]), sinkhorn_knopp(t, 0.07, 3), rtol=1e-5, atol=1e-7)
    center = torch.zeros(1, 1, 6)
    update_center_(center, t, 0.5)
    for r in two_ranks:
        torch.testing.assert_close(r["center"], center)
    x = torch.randn(GLOBAL, 5, generator=torch.Generator().manual_seed(5)).requires_grad_()
    koleo_loss(x).backward()
    for r in two_ranks:
        torch.testing.assert_close(r["koleo"][0], koleo_loss(x.detach()))
    # each process's rows get the gradient of the whole loss from every process (DDP then averages over them)
    torch.testing.assert_close(torch.cat([r["koleo"][1] for r in two_ranks]) / 2, x.grad, rtol=1e-5, atol=1e-7)


# ---- construction ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_teacher_runs_without_the_students_drop_path(name):
    cfg = tiny_cfg(name, "backbone.drop_path_rate=0.5", "backbone.drop_path_uniform=true")
    torch.manual_seed(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views)).train()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(method.backbone(x), method.backbone(x)), "the student drops paths"
        torch.testing.assert_close(method.backbone_t(x), method.backbone_t(x))


def test_dinov2_groups_follow_layer_decay_and_the_patch_embedding_multiplier():
    method = build(configs()["dinov2"])
    depth = len(method.backbone.net.blocks)
    ratio = {id(p): g["lr_ratio"] for g in method.param_groups() for p in g["params"]}
    named = dict(method.named_parameters())
    assert ratio[id(named["backbone.net.blocks.0.attn.qkv.weight"])] == pytest.approx(0.9 ** depth)
    assert ratio[id(named["backbone.net.patch_embed.proj.weight"])] == pytest.approx(0.2 * 0.9 ** (depth + 1))
    assert ratio[id(named["backbone.net.mask_token"])] == pytest.approx(0.9 ** (depth + 1))
    assert ratio[id(named["backbone.net.norm.weight"])] == 1.0 and ratio[id(named["head.mlp.0.weight"])] == 1.0
    assert vit_layer("register_tokens", 12) == 0 and vit_layer("blocks.11.ls1.gamma", 12) == 12
    no_decay = {id(p) for g in method.param_groups() if g.get("weight_decay") == 0.0 for p in g["params"]}
    assert id(named["backbone.net.blocks.0.norm1.weight"]) in no_decay and id(named["head.mlp.0.bias"]) in no_decay
    assert id(named["backbone.net.blocks.0.attn.qkv.weight"]) not in no_decay


def test_teacher_temperatures_warm_up_per_epoch_for_ibot_and_per_step_for_dinov2():
    """iBOT (main_ibot.py): np.linspace over the warm-up epochs, constant within an epoch, CLS and patches alike;
    DINOv2 (train.py CosineScheduler): np.linspace over the warm-up iterations."""
    from types import SimpleNamespace

    seen = {}
    for key in ("ibot_sep", "dinov2"):
        method = build(configs()[key])
        method.hparams.warmup_teacher_temp_epochs = 2
        temps = []
        for step in range(8):  # 4 epochs of 2 steps
            method._trainer = SimpleNamespace(max_epochs=4, current_epoch=step // 2, global_step=step,
                                              estimated_stepping_batches=8)
            temps.append((round(method.teacher_temperature(), 4), round(method.patch_temperature(), 4)))
        method._trainer = None
        seen[key] = temps
    assert seen["ibot_sep"] == [(0.04, 0.04)] * 2 + [(0.07, 0.07)] * 6
    assert [t for t, _ in seen["dinov2"]] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07, 0.07, 0.07]
    assert all(t == p for t, p in seen["dinov2"])


# ---- registers and DINOv2's files --------------------------------------------------------------------------
def dinov2_state(depth=2, dim=32, patch=4, grid=5, registers=2, chunks=0, seed=0):
    """A random DinoVisionTransformer.state_dict() (names as DINOv2's, LayerScale, a grid x grid position embedding as
    its 37 x 37 one for 518 px)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, patch, patch), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim)
    for i in range(depth):
        p = f"blocks.{i // math.ceil(depth / chunks)}.{i}." if chunks else f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": r(dim), p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
                   p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim), p + "ls2.gamma": r(dim)})
    return sd


def dinov2_cls(sd, x, depth=2, heads=2, patch=4):
    """DINOv2's x_norm_clstoken, written out from vision_transformer.py / layers/ (no timm)."""
    sd = {k.split(".", 2)[0] + "." + k.split(".", 2)[2] if k.count(".") > 2 and k.split(".")[1].isdigit()
          and k.split(".")[2].isdigit() else k: v for k, v in sd.items()}
    B, D = x.shape[0], sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1)
    m, h = round(math.sqrt(sd["pos_embed"].shape[1] - 1)), x.shape[-1] // patch
    pos = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, m, m, D).permute(0, 3, 1, 2), mode="bicubic",
                        antialias=False, scale_factor=((h + 0.1) / m, (h + 0.1) / m)).permute(0, 2, 3, 1).reshape(1, -1, D)
    t = t + torch.cat([sd["pos_embed"][:, :1], pos], dim=1)
    if "register_tokens" in sd:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], dim=1)
    for i in range(depth):
        p = lambda n, i=i: sd[f"blocks.{i}.{n}"]  # noqa: E731
        y = F.layer_norm(t, (D,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        a = F.softmax(q @ k.transpose(-2, -1) * (D // heads) ** -0.5, dim=-1) @ v
        t = t + p("ls1.gamma") * F.linear(a.transpose(1, 2).reshape(B, -1, D), p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (D,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def vit(**kw):
    return ViT(**{**dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, init_values=1e-5,
                         reg_tokens=2), **kw})


@pytest.mark.parametrize("chunks", [0, 2])
def test_a_dinov2_file_loads_by_name_and_gives_dinov2s_features(tmp_path, chunks):
    sd = dinov2_state(chunks=chunks)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"dino_head.mlp.0.weight": torch.zeros(2)}}
               if chunks else sd, tmp_path / "w.pth")
    ours = vit(pretrained=str(tmp_path / "w.pth")).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(ours(x), dinov2_cls(sd, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.add_mask_token(), sd["mask_token"])  # kept for iBOT / DINOv2 to train on
    maps = ours.last_attention(x)  # the CLS over the 16 patches only, registers left out
    assert maps.shape == (3, 2, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, 2))


def test_registers_sit_between_cls_and_patches_and_leave_the_output():
    model = vit(reg_tokens=3, init_values=None).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model.encode(model.tokens(x))
    assert out.shape == (2, 17, 32)
    seen = []
    model.net.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model(x)
    assert seen == [torch.Size([2, 20, 32])]  # CLS + 3 registers + 16 patches inside the blocks


def test_bad_dinov2_files_are_one_line(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(dinov2_state(), path)
    cases = [(dict(init_values=None), "has LayerScale .*set backbone.init_values=1.0e-5"),
             (dict(reg_tokens=0), "has 2 register tokens but this ViT has none: set backbone.reg_tokens=2"),
             (dict(patch_size=2), "cuts images into 4 px patches but backbone.patch_size=2")]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            vit(pretrained=str(path), **kw)
    sd = dinov2_state()
    sd["blocks.0.mlp.w12.weight"] = sd.pop("blocks.0.mlp.fc1.weight")
    torch.save(sd, path)
    with pytest.raises(UserError, match="SwiGLU"):
        vit(pretrained=str(path))


# ---- continued pre-training: the heads first ----------------------------------------------------------------
def test_head_warmup_trains_the_heads_on_a_frozen_loaded_backbone(tmp_path):
    path = tmp_path / "dinov2.pth"
    torch.save(dinov2_state(grid=5, registers=0), path)
    cfg = tiny_cfg("dinov2", f"backbone.pretrained={path}", "backbone.init_values=1e-5", "method.head_warmup_epochs=1",
                   "trainer.max_epochs=2", "data.max_train_samples=64", "method.optimizer.lr=0.05",
                   "views.local_crops=2")
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    loaded = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    head = method.head.mlp[0].weight.clone()

    def knn():
        feats = [extract_features(method, method.views, loader, "cpu") for loader in
                 (dm.eval_train_dataloader(), dm.eval_val_dataloader())]
        return knn_top1(*feats[0], *feats[1], dm.num_classes, 20, 0.07)

    seen = {"before": knn(), "lrs": []}

    class AfterWarmup(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 0:  # the lr each step of the warm-up epoch uses
                seen["lrs"] += [g["lr"] for g in trainer.optimizers[0].param_groups if g.get("backbone")]

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                seen["after"] = knn()
                seen["moved"] = [k for k, v in method.backbone.state_dict().items() if not torch.equal(v, loaded[k])]
                seen["teacher_moved"] = [k for k, v in method.backbone_t.state_dict().items()
                                         if not torch.equal(v, loaded[k])]
                seen["head_moved"] = not torch.equal(method.head.mlp[0].weight, head)
                seen["teacher_head_moved"] = not torch.equal(method.head_t.mlp[0].weight, head)

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[AfterWarmup()])
    trainer.fit(method, datamodule=dm)  # 4 steps per epoch: epoch 0 is the head warm-up
    assert seen["moved"] == [] and seen["teacher_moved"] == [], "the backbone moved during the head warm-up"
    assert seen["head_moved"] and seen["teacher_head_moved"]
    assert len(seen["lrs"]) >= 4 and all(lr == 0 for lr in seen["lrs"])
    assert seen["after"] >= seen["before"], seen
    print(f"head warm-up: kNN top-1 of the loaded backbone {seen['before']:.2f}, after the warm-up {seen['after']:.2f}")
    assert any(not torch.equal(v, loaded[k]) for k, v in method.backbone.state_dict().items()), "then it learns"
    trainer.save_checkpoint(tmp_path / "last.ckpt")  # plain values only: it loads safely
    assert load_checkpoint(tmp_path / "last.ckpt")["hyper_parameters"]["mask_ratio"] == (0.1, 0.5)


# ---- bad settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "line"), [
    (["method=dinov2", "backbone=convnet"], "DINOv2 needs a ViT backbone with the token API: use backbone=vit_cpu"),
    (["method=ibot", "backbone=vit_cpu", "method.mask_ratio=[0.6,0.2]"], "method.mask_ratio=[0.6, 0.2] must be"),
    (["method=dinov2", "backbone=vit_cpu", "method.centering=mean"], "method.centering='mean'; allowed: centering"),
    (["method=ibot", "backbone=vit_cpu", "method.head_warmup_epochs=-1"], "method.head_warmup_epochs=-1 must be >= 0"),
    (["method=dinov2", "backbone=vit_cpu", "method.evaluate=both"], "method.evaluate='both'; allowed: teacher, student"),
    (["method=dinov2", "backbone=vit_cpu", "backbone.reg_tokens=-2"], "backbone.reg_tokens=-2 must be a whole number"),
])
def test_bad_settings_are_one_line(overrides, line):
    problems = config_problems(compose(["data=fashion_mnist", *overrides]))
    assert any(p.startswith(line) for p in problems), problems
