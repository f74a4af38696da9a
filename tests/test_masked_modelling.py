"""MAE, the VQ-VAE tokenizer and BEiT against naive formulas; the attention-map pictures; DINO and MoCo v3 on a
ViT with multi-crop views of two sizes."""

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from src.callbacks.pictures import AttentionMaps
from src.config.rules import config_problems
from src.methods.beit import load_tokenizer, tokenizer_problems
from src.nn.quantizer import VectorQuantizer, nearest_codes
from src.utils.errors import UserError
from tests.helpers import tiny_cfg, tiny_tokenizer
from tests.test_methods import build, fit


def tiny(name, *overrides, vit=None):
    L.seed_everything(0)
    method, _ = build(tiny_cfg(name, *overrides, vit=vit))
    return method


def views_of(method, n=4):
    torch.manual_seed(0)
    return method.views(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8))


# ---- MAE ----------------------------------------------------------------------------------------------
def test_mae_loss_is_the_mean_squared_error_on_the_masked_patches_only():
    method = tiny("mae")
    x = method.images(views_of(method))
    torch.manual_seed(3)
    loss = method.training_loss([x])
    torch.manual_seed(3)
    masking, pred = method.reconstruct(x)
    pixels = method.backbone.patchify(x)  # 4 x 16 x 48
    total, count = 0.0, 0
    for b in range(4):  # naive: per sample, per masked patch, the per-patch normalised target
        for i in range(16):
            if masking.mask[b, i]:
                t = pixels[b, i]
                t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                total += ((pred[b, i] - t) ** 2).mean()
                count += 1
    assert count == 4 * (16 - 4)  # 75% of 16 patches masked
    torch.testing.assert_close(loss, total / count)


def test_mae_encoder_sees_only_the_visible_patches():
    method = tiny("mae")
    lengths = []
    method.backbone.net.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    method.training_loss(views_of(method))
    assert lengths == [1 + 4]  # CLS + round(16 x 0.25)
    method.eval()
    method(method.images(views_of(method)))  # evaluation reads the whole image
    assert lengths[-1] == 1 + 16


def test_mae_pictures_keep_the_visible_patches():
    method = tiny("mae").eval()
    x = method.images(views_of(method))
    rows = method.pictures(x)
    assert list(rows) == ["input", "masked", "reconstruction"]
    torch.manual_seed(0)
    masking, _ = method.reconstruct(x)
    visible = (~masking.mask).view(4, 1, 4, 1, 4, 1).expand(4, 1, 4, 4, 4, 4).reshape(4, 1, 16, 16)
    visible = visible.expand_as(x)
    torch.testing.assert_close(rows["reconstruction"][visible], rows["input"][visible])
    assert all(r.min() >= 0 and r.max() <= 1 for r in rows.values())


# ---- the VQ-VAE tokenizer -------------------------------------------------------------------------------
def test_quantizer_takes_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    codebook, z = torch.randn(7, 3), torch.randn(20, 3)
    naive = torch.tensor([min(range(7), key=lambda k: float(((v - codebook[k]) ** 2).sum())) for v in z])
    assert torch.equal(nearest_codes(z, codebook), naive)
    vq = VectorQuantizer(7, 3).eval()
    vq.codebook.copy_(codebook)
    z_e = torch.randn(2, 3, 2, 2, requires_grad=True)
    q = vq(z_e)
    assert torch.equal(q.ids.flatten(), nearest_codes(z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3), codebook))
    torch.testing.assert_close(q.z_q.detach(), codebook[q.ids].permute(0, 3, 1, 2))
    grad = torch.randn(2, 3, 2, 2)
    q.z_q.backward(grad)
    torch.testing.assert_close(z_e.grad, grad)  # straight-through
    assert torch.equal(vq.codebook, codebook)  # eval mode: no EMA update


def test_quantizer_in_eval_mode_runs_no_collective(monkeypatch):
    """BEiT's tokens and the pictures (drawn on rank 0 alone) quantize in eval mode: a collective there would
    leave the other ranks waiting under DDP."""
    import src.nn.quantizer as quantizer

    def refuse(*args):
        raise AssertionError("a collective in eval mode")

    for name in ("all_reduce_sum", "gather", "broadcast"):
        monkeypatch.setattr(quantizer.du, name, refuse)
    vq = VectorQuantizer(5, 3).eval()
    q = vq(torch.randn(2, 3, 2, 2))
    assert q.usage.sum() == 8 and q.ids.shape == (2, 2, 2)


def test_quantizer_ema_update_follows_the_formula():
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 2, decay=0.9, eps=0.0, restart_threshold=0.0).train()
    vq.initialised.fill_(True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    vq.sums.copy_(vq.codebook)
    vq.counts.fill_(1.0)
    z = torch.tensor([[0.5, 0.0], [1.0, -1.0], [9.0, 9.0]])  # two vectors to code 0, one to code 1, none to 2
    vq(z.t().reshape(1, 2, 3, 1))
    counts = torch.tensor([0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
    sums = 0.9 * torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]) + 0.1 * torch.tensor([[1.5, -1.0], [9.0, 9.0], [0, 0]])
    torch.testing.assert_close(vq.counts, counts)
    torch.testing.assert_close(vq.codebook, sums / counts.unsqueeze(1))


def test_quantizer_restarts_unused_codes_on_encoder_outputs():
    vq = VectorQuantizer(4, 2, decay=0.5, restart_threshold=0.9).train()
    vq.initialised.fill_(True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [100.0, 100.0], [-100.0, 100.0], [100.0, -100.0]]))
    vq.sums.copy_(vq.codebook)
    z = torch.randn(1, 2, 4, 4) * 0.1  # every vector near code 0
    vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (1, 2, 3):  # unused: count 0.5 < 0.9, restarted on one of the batch's vectors
        assert any(torch.equal(vq.codebook[k], v) for v in flat) and vq.counts[k] == 1.0


def test_tokenizer_checkpoint_rebuilds_the_same_tokenizer():
    path = tiny_tokenizer()
    tokenizer = load_tokenizer(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["tokenizer"] == {"stride": 4, "channels": 3, "num_codes": 64}
    assert not any(p.requires_grad for p in tokenizer.parameters()) and not tokenizer.training
    x = torch.randn(2, 3, 16, 16)
    ids = tokenizer.tokenize(x)
    assert ids.shape == (2, 16) and ids.max() < 64
    assert tokenizer.decode(ids, (4, 4)).shape == (2, 3, 16, 16)


def test_tokenizer_draws_reconstructions_and_codes():
    method = tiny("vqvae").eval()
    rows = method.pictures(method.images(views_of(method, n=5)))
    assert list(rows) == ["input", "reconstruction", "codes"]
    assert all(r.shape == (5, 3, 16, 16) and r.min() >= 0 and r.max() <= 1 for r in rows.values())


# ---- BEiT -----------------------------------------------------------------------------------------------
def test_beit_predicts_the_tokens_of_the_masked_patches_only():
    method = tiny("beit")
    x = method.images(views_of(method))
    seen = {}
    original = method.backbone.tokens
    method.backbone.tokens = lambda x, mask=None, mask_token=None: (seen.update(mask=mask), original(x, mask, mask_token))[1]
    torch.manual_seed(5)
    loss, logs = method.training_loss([x])
    mask = seen["mask"]
    assert mask.shape == (4, 16) and (mask.sum(dim=1) == round(0.4 * 16)).all()
    ids = method.visual_tokens(x)
    torch.manual_seed(5)
    _, logits = method.predict(x)
    naive = torch.stack([F.cross_entropy(logits[b, i:i + 1], ids[b, i:i + 1])
                         for b in range(4) for i in range(16) if mask[b, i]]).mean()
    torch.testing.assert_close(loss, naive)
    assert 0 <= float(logs["pretext_acc"]) <= 1


def test_beit_keeps_its_tokenizer_frozen_and_in_eval_mode():
    method = tiny("beit")
    method.train()
    assert not method.tokenizer.training and all(not p.requires_grad for p in method.tokenizer.parameters())
    before = {k: v.clone() for k, v in method.tokenizer.state_dict().items()}
    cfg = tiny_cfg("beit")
    L.seed_everything(0)
    method, dm = build(cfg)
    fit(method, dm, steps=2)
    assert all(torch.equal(v, before[k]) for k, v in method.tokenizer.state_dict().items())
    rows = method.eval().pictures(method.images(views_of(method)))
    assert list(rows) == ["input", "masked", "tokens", "prediction"]


def test_beit_refuses_a_missing_foreign_or_mismatched_tokenizer(tmp_path):
    assert "needs a visual tokenizer" in tokenizer_problems(None, 4, 3)[0]
    assert "is not a file" in tokenizer_problems(str(tmp_path / "none.ckpt"), 4, 3)[0]
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert "is not a tokenizer checkpoint" in tokenizer_problems(str(foreign), 4, 3)[0]
    path = tiny_tokenizer()
    assert tokenizer_problems(path, 4, 3) == []
    [grid] = tokenizer_problems(path, 8, 3)
    assert "one token per 4x4 px but the ViT's patches are 8x8" in grid
    [channels] = tokenizer_problems(path, 4, 1)
    assert "reads 3-channel images but data.channels=1" in channels
    with pytest.raises(Exception, match="the token grid must be the patch grid") as error:
        tiny("beit", "backbone.patch_size=8")
    assert isinstance(error.value.__cause__, UserError)  # src.train turns it into one line
    problems = config_problems(tiny_cfg("beit", "method.mask_ratio=1.5"))
    assert problems == ["method.mask_ratio=1.5 must be in (0, 1): the share of patches hidden from the encoder"]


def test_masked_methods_need_a_vit():
    problems = config_problems(tiny_cfg("mae", vit=False))
    assert problems == ["MAE needs a ViT backbone with the token API: use backbone=vit_cpu (CPU-sized), vit_tiny, "
                        "vit_small or vit_base; ConvNet has none"]


# ---- pictures and the joint-embedding methods on a ViT ---------------------------------------------------
def test_attention_maps_are_drawn_per_head_and_sum_to_one(tmp_path):
    method = tiny("dino", "views.crops.2.size=8", vit=True)
    dm = instantiate(tiny_cfg("dino", vit=True).data)
    callback = AttentionMaps(every_n_epochs=1, num_images=3)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(method, datamodule=dm)
    [path] = callback.saved
    assert path == tmp_path / "pictures" / "attention_0001.png"
    maps = callback.maps
    assert maps.shape == (3, 2, 4, 4)  # 3 images x 2 heads x the 4x4 patch grid
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, 2))
    width, height = Image.open(path).size
    assert (width, height) == (2 + 3 * (16 + 2), 2 + 3 * (16 + 2))  # the image and 2 heads per row, 3 rows
    assert not AttentionMaps().applies(tiny("simclr"))  # a convnet has no attention to draw


@pytest.mark.parametrize("name, overrides", [("dino", ["views.crops.2.size=8"]), ("moco_v3", [])])
def test_joint_embedding_methods_train_on_a_vit(name, overrides):
    cfg = tiny_cfg(name, *overrides, vit=True)
    assert config_problems(cfg) == [], config_problems(cfg)
    L.seed_everything(0)
    method, dm = build(cfg)
    if name == "dino":  # 2 global crops of 16 px (4x4 patches) and 8 local ones of 8 px (2x2 patches)
        assert [v.shape[-1] for v in views_of(method)] == [16, 16] + [8] * 8
    before = method.backbone.net.blocks[0].attn.qkv.weight.clone()
    trainer = fit(method, dm, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not torch.equal(method.backbone.net.blocks[0].attn.qkv.weight, before)
    json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_quantizer_keeps_a_restarted_code_that_is_used_with_threshold_two():
    """A dead code restarted on an encoder output starts at the threshold (count 2, sums 2 x the code): once it takes
    16 vectors a batch it stays (0.99 x 2 + 0.01 x 16 >= 2). Started at count 1 it fell under 2 again and was
    drawn anew at every step, live or not."""
    vq = VectorQuantizer(4, 2, decay=0.99, eps=0.0, restart_threshold=2.0).train()
    vq.initialised.fill_(True)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [1000.0, 1000.0]]))
    vq.sums.copy_(vq.codebook * 10)
    vq.counts.copy_(torch.tensor([10.0, 10.0, 10.0, 0.1]))  # codes 0-2 alive, code 3 dead and far from the data
    torch.manual_seed(0)
    batch = lambda: (torch.tensor([5.0, 5.0]) + 0.01 * torch.randn(16, 2)).t().reshape(1, 2, 16, 1)  # noqa: E731
    vq(batch())  # no vector reaches code 3: restarted on one of them
    assert vq.counts[3] == 2.0 and (vq.codebook[3] - torch.tensor([5.0, 5.0])).abs().max() < 0.1
    torch.testing.assert_close(vq.sums[3], 2 * vq.codebook[3])
    for _ in range(3):  # now every vector goes to code 3: it stays, its count follows the EMA
        before = vq.counts[3].item()
        vq(batch())
        torch.testing.assert_close(vq.counts[3], torch.tensor(0.99 * before + 0.01 * 16))
        assert vq.counts[3] >= 2.0
