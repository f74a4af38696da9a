"""ViT backbones (the token API MAE and BEiT share), timm backbones, loading downloaded weights, and the token
masking generators of MAE and BEiT: checked against timm's own code paths and naive formulas."""

import math

import numpy as np
import pytest
import torch
import torchvision
from hydra.utils import instantiate
from timm.models.vision_transformer import VisionTransformer

from src.backbones.resnet import ResNet
from src.backbones.timm_model import TimmBackbone
from src.backbones.vit import ViT
from src.config.compose import compose
from src.config.rules import config_problems
from src.nn.masks import beit_block_bounds, block_mask, block_masks, num_visible, random_masking
from src.nn.tokens import patchify, sincos_1d, sincos_2d, unpatchify
from src.utils.errors import UserError


def tiny_vit(**kwargs) -> ViT:
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, in_channels=3, embed_dim=32, depth=2, num_heads=2)
    return ViT(**{**options, **kwargs}).eval()


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_is_timms_own_forward_at_the_native_size(pool):
    vit = tiny_vit(pool=pool)
    x = torch.randn(3, 3, 16, 16)
    tokens = vit.net.forward_features(x)  # timm: patch embed, cls, pos embed, blocks, norm
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)
    torch.testing.assert_close(vit(x), expected)
    assert vit(x).shape == (3, vit.out_dim) and vit.feature_map(x).shape == (3, 32, 4, 4)


def test_other_sizes_match_timms_dynamic_image_size():
    """A local crop (8 px: a 2x2 grid) gets the position embedding resampled as timm's dynamic_img_size does."""
    vit = tiny_vit()
    ref = VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=0, embed_dim=32, depth=2, num_heads=2,
                            dynamic_img_size=True).eval()
    ref.load_state_dict(vit.net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(vit(x), ref.forward_features(x)[:, 0])
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        vit(torch.randn(1, 3, 10, 10))


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    t = patchify(x, 4)
    assert t.shape == (2, 6, 48)
    torch.testing.assert_close(unpatchify(t, 4, (2, 3), 3), x)
    # token 4 = grid row 1, column 1; its vector is laid out (row in patch, column in patch, channel)
    r, c, ch = 2, 3, 1
    assert t[1, 4, (r * 4 + c) * 3 + ch] == x[1, ch, 4 + r, 4 + c]


def test_sincos_embeddings_follow_the_formula():
    pos = sincos_2d((3, 5), 8)  # 15 x 8: columns in the first half, rows in the second
    for i in range(3):
        for j in range(5):
            for k in range(2):
                w = 1 / 10000 ** (k / 2)
                row = pos[i * 5 + j]
                assert math.isclose(row[k], math.sin(j * w), abs_tol=1e-6)
                assert math.isclose(row[2 + k], math.cos(j * w), abs_tol=1e-6)
                assert math.isclose(row[4 + k], math.sin(i * w), abs_tol=1e-6)
                assert math.isclose(row[6 + k], math.cos(i * w), abs_tol=1e-6)
    assert sincos_1d(torch.arange(4), 6).shape == (4, 6)


def test_encoding_a_subset_equals_the_full_forward_with_attention_restricted_to_it():
    """encode(tokens, keep) == the full sequence where every query may only attend to CLS and the kept tokens
    (timm's own attn_mask path), read at the kept positions in keep's order."""
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    tokens = vit.tokens(x)  # 2 x 16 x D
    keep = torch.stack([torch.tensor([5, 0, 9, 15]), torch.tensor([3, 12, 1, 7])])
    subset = vit.encode(tokens, keep)  # 2 x 5 x D

    net = vit.net
    cls = (net.cls_token + net.pos_embed[:, :1]).expand(2, -1, -1)
    z = torch.cat([cls, tokens], dim=1)  # 2 x 17 x D
    allowed = torch.zeros(2, 17, dtype=torch.bool)
    allowed[:, 0] = True
    allowed[torch.arange(2).unsqueeze(1), keep + 1] = True
    attn_mask = allowed[:, None, None, :].expand(2, 1, 17, 17)  # keys a query may attend to
    for block in net.blocks:
        z = block(z, attn_mask=attn_mask)
    full = net.norm(z)
    torch.testing.assert_close(subset[:, 0], full[:, 0])
    torch.testing.assert_close(subset[:, 1:], full[torch.arange(2).unsqueeze(1), keep + 1])
    # and keeping every token, in order, is the ordinary forward
    torch.testing.assert_close(vit.encode(tokens, torch.arange(16).expand(2, -1)), vit.encode(tokens))


def test_mask_token_replaces_the_masked_patch_embeddings():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 4]] = mask[1, 7] = True
    token = torch.randn(32)
    out, plain = vit.tokens(x, mask, token), vit.tokens(x)
    pos = vit.net.pos_embed[0, 1:]
    torch.testing.assert_close(out[mask], token + pos[mask.nonzero()[:, 1]])
    torch.testing.assert_close(out[~mask], plain[~mask])


def test_last_attention_is_the_attention_matrix_of_timms_unfused_path():
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    attn = vit.net.blocks[-1].attn
    attn.fused_attn = False  # timm then forms the matrix and passes it through attn_drop
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    vit(x)
    expected = seen[-1][:, :, 0, 1:]  # B x heads x L: the CLS query's weights on the patches
    expected = expected / expected.sum(dim=-1, keepdim=True)
    maps = vit.last_attention(x)
    assert maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(maps.flatten(2), expected)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 2))


def test_sincos_and_frozen_patch_embedding_options():
    vit = tiny_vit(pos_embed="sincos", freeze_patch_embed=True)
    assert not vit.net.pos_embed.requires_grad and not any(p.requires_grad for p in vit.net.patch_embed.parameters())
    torch.testing.assert_close(vit.net.pos_embed[0, 1:], sincos_2d((4, 4), 32))
    assert vit.net.pos_embed[0, 0].abs().sum() == 0


# ---- weights from elsewhere ------------------------------------------------------------------------------
def test_vit_weights_load_with_any_prefix_and_another_grid(tmp_path):
    src = tiny_vit()
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in src.net.state_dict().items()},
                "epoch": 3}, path)  # as DINO's full checkpoints nest it
    same = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(same(x), src(x))
    bigger = ViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, pretrained=str(path))
    assert bigger.net.pos_embed.shape == (1, 65, 32)  # resampled from 4x4 to 8x8
    gray = ViT(img_size=16, patch_size=4, in_channels=1, embed_dim=32, depth=2, num_heads=2, pretrained=str(path)).eval()
    torch.testing.assert_close(gray(x.mean(dim=1, keepdim=True).expand(-1, 1, -1, -1)),
                               src(x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)))  # RGB weights summed for gray
    with pytest.raises(UserError, match=r"does not fit this ViT \(64 wide, depth 2\).*another shape"):
        ViT(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, pretrained=str(path))


def test_torchvision_resnet_weights_load_into_our_resnet(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision's names, with the fc classifier
    ours = ResNet("resnet18", pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    torch.testing.assert_close(ours(x), reference(x))
    gray = ResNet("resnet18", in_channels=1, pretrained=str(path))  # the RGB first conv summed for one channel
    torch.testing.assert_close(gray.net.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    with pytest.raises(UserError, match="does not fit this resnet18 with the CIFAR stem.*conv1.weight"):
        ResNet("resnet18", cifar_stem=True, pretrained=str(path))
    with pytest.raises(UserError, match="none of its .* tensors"):
        ResNet("resnet50", pretrained=str(_save(tmp_path / "other.pth", {"fc.weight": torch.zeros(2, 2)})))


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_bad_weights_files_are_one_clear_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(UserError, match="not a torch.save archive"):
        ResNet("resnet18", pretrained=str(text))
    with pytest.raises(UserError, match="is not a file"):
        ResNet("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="holds no state dict"):
        ResNet("resnet18", pretrained=str(_save(tmp_path / "list.pth", [1, 2, 3])))


def test_any_timm_model_is_a_backbone_and_loads_a_state_dict(tmp_path):
    net = TimmBackbone("test_resnet", in_channels=1)
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, net.out_dim)
    path = _save(tmp_path / "w.pth", {"model": {f"module.{k}": v for k, v in net.net.state_dict().items()}})
    again = TimmBackbone("test_resnet", in_channels=1, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(again(x), net.eval()(x))
    with pytest.raises(UserError, match="not a timm architecture; did you mean test_resnet"):
        TimmBackbone("test_resnt")
    assert config_problems(compose(["backbone=timm"])) == [
        "backbone.name is not set: pass a timm architecture, e.g. backbone.name=convnext_tiny"]
    cfg = compose(["backbone=timm", "backbone.name=test_convnext", "backbone.model_kwargs={}"])
    assert config_problems(cfg) == [] and instantiate(cfg.backbone)(torch.randn(1, 1, 64, 64)).ndim == 2


def test_vit_preflight_names_the_view_that_does_not_fit_the_patches():
    problems = config_problems(compose(["backbone=vit_cpu", "data=cifar10", "method=dino"]))
    assert problems == ["views.crops[2].size=14 is not a multiple of backbone.patch_size=4: a ViT cuts views into "
                        "whole patches; set views.crops.2.size=12 (or 16)"]
    assert config_problems(compose(["backbone=vit_cpu", "method=dino"])) == []  # 28 px: local crops of 12 = 3x3
    assert compose(["backbone=vit_base", "data=imagenet"]).backbone.patch_size == 16


# ---- token masking generators ------------------------------------------------------------------------
@pytest.mark.parametrize("L, ratio", [(49, 0.75), (196, 0.75), (16, 0.5), (10, 0.9)])
def test_mae_masking_keeps_round_l_times_one_minus_r_and_restores_the_order(L, ratio):
    torch.manual_seed(0)
    m = random_masking(5, L, ratio)
    k = round(L * (1 - ratio))
    assert num_visible(L, ratio) == k and m.keep.shape == (5, k)
    assert (m.mask.sum(dim=1) == L - k).all()
    assert (~m.mask).gather(1, m.keep).all()  # the kept tokens are exactly the unmasked ones
    tokens = torch.randn(5, L, 3)
    visible_first = torch.argsort(m.restore, dim=1)  # the shuffle order: [visible..., masked...]
    shuffled = tokens.gather(1, visible_first.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(shuffled.gather(1, m.restore.unsqueeze(-1).expand(-1, -1, 3)), tokens)
    assert torch.equal(visible_first[:, :k], m.keep)
    with pytest.raises(ValueError, match="must be in"):
        random_masking(2, L, 1.0)


@pytest.mark.parametrize("grid, ratio", [((14, 14), 0.4), ((7, 7), 0.4), ((4, 4), 0.4), ((8, 6), 0.5)])
def test_beit_masks_are_blocks_of_the_stated_count_and_bounds(grid, ratio):
    num = round(ratio * grid[0] * grid[1])
    low = beit_block_bounds(grid)
    assert beit_block_bounds((14, 14)) == 16 and beit_block_bounds((7, 7)) == 4
    rng = np.random.default_rng(0)
    for _ in range(200):
        blocks = []
        mask = block_mask(grid, num, low, 0.3, rng, blocks=blocks)
        assert mask.sum() == num
        union = np.zeros(grid, dtype=bool)
        for top, left, h, w, remaining in blocks:
            assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
            assert h * w >= min(low, remaining) and 0.3 <= h / w <= 1 / 0.3
            union[top:top + h, left:left + w] = True
        assert np.array_equal(union, mask)
    torch.manual_seed(0)
    batch = block_masks(4, grid, ratio)
    assert batch.shape == (4, grid[0] * grid[1]) and (batch.sum(dim=1) == num).all()
    torch.manual_seed(0)
    assert torch.equal(block_masks(4, grid, ratio), batch)  # reproducible from torch's seed


@pytest.mark.parametrize("name", ["dino_vit_small_imagenet", "moco_v3_vit_small_imagenet", "mae_vit_base_imagenet"])
def test_vit_experiments_compose_and_pass_the_preflight_check(name):
    """The recipe keeps its own data (ImageNet, whose root a user gives); on 224 px fake data it passes every check."""
    cfg = compose([f"experiment={name}"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.data == "imagenet" and cfg.backbone.patch_size == 16
    fake = compose([f"experiment={name}", "data=fake", "data.image_size=224", "data.crop_size=224", "hardware=cpu",
                    "precision=fp32"])
    assert config_problems(fake) == []
    assert instantiate(fake.views).groups[-1]["size"] % 16 == 0  # DINO's local crops: 96 px = 6x6 patches
