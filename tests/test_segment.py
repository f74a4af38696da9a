"""protocol=segment: DINO's 60%-of-the-mass rule, the Jaccard index, masks beside a folder dataset (resized, missing,
unreadable) and Pets' trimaps, an oracle attention scoring 100, `python -m src.eval ... protocol=segment` writing
<stem>.segment.json, and each bad input as one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from src.backbones.vit import ViT
from src.data.datamodule import SSLDataModule
from src.data.datasets import IGNORE, nonzero_foreground
from src.data.transfer import pets_foreground, pets_trimap
from src.data.views import Views
from src.protocols import Subject
from src.protocols.segment import Segment, eval_geometry, jaccard, mass_masks
from src.utils.errors import UserError


def test_mass_rule_keeps_the_largest_patches_up_to_sixty_percent():
    attention = torch.tensor([[0.0] * 8 + [0.125] * 8])  # uniform over 8 of 16 patches
    kept = mass_masks(attention, 0.6)
    assert int(kept.sum()) == 5 and not kept[0, :8].any()  # 5 x 0.125 = 62.5% >= 60%, 4 x 0.125 < 60%
    a = torch.tensor([[0.05, 0.5, 0.1, 0.35]])  # sorted: .05 .1 .35 .5; the two largest hold 85%
    assert mass_masks(a, 0.6).tolist() == [[False, True, False, True]]
    assert mass_masks(a, 0.4).tolist() == [[False, True, False, False]]


def test_jaccard_ignores_the_uncertain_pixels():
    mask = torch.tensor([[[1, 1, 0, IGNORE]]], dtype=torch.uint8)
    pred = torch.tensor([[[[True, False, True, True]], [[True, True, False, True]]]])  # 2 heads
    torch.testing.assert_close(jaccard(pred, mask), torch.tensor([[1 / 3, 1.0]]))
    empty = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    assert float(jaccard(empty, torch.zeros(1, 1, 4, dtype=torch.uint8))) == 1.0


def test_masks_follow_the_eval_view_geometry():
    masks = torch.zeros(1, 1, 6, 8, dtype=torch.uint8)
    masks[..., 1] = 1  # second column
    out = eval_geometry(masks, 3)  # shorter side 6 -> 3 (width 4), centre crop 3 of 4 columns from column 0 or 1
    assert out.shape == (1, 3, 3) and set(out.unique().tolist()) <= {0, 1}


def test_pets_trimaps_are_read_as_pet_background_and_border():
    assert pets_trimap("/d/oxford-iiit-pet/images/Abyssinian_1.jpg") == "/d/oxford-iiit-pet/annotations/trimaps/Abyssinian_1.png"
    assert pets_foreground(np.array([[1, 2, 3]])).tolist() == [[1, 0, IGNORE]]
    assert nonzero_foreground(np.array([[[0, 0, 0, 255], [0, 7, 0, 0]]])).tolist() == [[0, 1]]  # alpha is no colour


# ---- a folder with masks ------------------------------------------------------------------------------------
def square_image(rng, size=16):
    """A dark image with a bright rectangle of whole 4 px patches, and its mask."""
    top, left = rng.integers(0, 3, 2) * 4
    h, w = rng.integers(1, 3, 2) * 4
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top:top + h, left:left + w] = 1
    image = np.stack([mask * 200 + 20] * 3, axis=-1).astype(np.uint8)
    return image, mask


def folder(tmp_path):
    """root/{train,val}/{a,b}/*.png and masks/val/{a,b}/*.png at twice the size; one mask missing, one broken."""
    rng = np.random.default_rng(0)
    root, masks = tmp_path / "data", tmp_path / "masks"
    for split, n in (("train", 4), ("val", 4)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            (masks / split / cls).mkdir(parents=True)
            for i in range(n):
                image, mask = square_image(rng)
                Image.fromarray(image).save(root / split / cls / f"{i}.png")
                big = Image.fromarray(mask * 255).resize((32, 32), Image.NEAREST)
                big.save(masks / split / cls / f"{i}.png")
    (masks / "val" / "a" / "0.png").unlink()
    (masks / "val" / "b" / "1.png").write_bytes(b"not a png")
    return root, masks


def data(root, masks, **kw):
    dm = SSLDataModule("imagefolder", root=str(root), image_size=16, crop_size=16, channels=3, num_classes=None,
                       mean=[0.5] * 3, std=[0.5] * 3, batch_size=4, eval_batch_size=4, masks=str(masks), **kw)
    dm.setup("fit")
    return dm


class OracleViT(nn.Module):
    """Attention from the image itself: 61% of it spread over the bright patches, 39% over the others."""

    num_heads, patch_size = 2, 4

    def last_attention(self, x):
        bright = torch.nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), 4) > 0  # B x 1 x 4 x 4
        fg = bright.float() / bright.flatten(1).sum(1).view(-1, 1, 1, 1)
        bg = (~bright).float() / (~bright).flatten(1).sum(1).view(-1, 1, 1, 1)
        return (0.61 * fg + 0.39 * bg).expand(-1, self.num_heads, -1, -1)


def subject(model, dm, tmp_path):
    views = Views([{"size": 16}], [0.5] * 3, [0.5] * 3, eval_size=16)
    return Subject(model, views, dm, torch.device("cpu"), pictures=lambda what: tmp_path / f"{what}.png")


def test_attention_equal_to_the_mask_scores_100_and_bad_masks_are_counted(tmp_path):
    root, masks = folder(tmp_path)
    dm = data(root, masks)
    pairs = dm.segmentation_pairs()
    image, mask, status = pairs[2]  # val/a/2.png: its 32 px mask resized to the image
    assert status == 0 and mask.shape == (1, 16, 16) and torch.equal(mask[0] == 1, image[0] > 100)
    out = Segment(pictures=2).run(subject(OracleViT(), dm, tmp_path))
    assert out["segment_jaccard"] == 100.0 and out["segment_jaccard_one_head"] == 100.0
    assert (out["segment_images"], out["segment_missing_masks"], out["segment_unreadable_masks"]) == (6, 1, 1)
    assert Image.open(out["segment_picture"]).size[0] > 3 * 16
    random = Segment().run(subject(ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2), dm, tmp_path))
    assert 0 <= random["segment_jaccard"] <= 100 and random["segment_images"] == 6


def test_src_eval_writes_the_segment_json_beside_the_weights(tmp_path, capsys):
    from src.eval import main

    root, masks = folder(tmp_path)
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).net.state_dict(), weights)
    main(["backbone=vit_cpu", f"backbone.pretrained={weights}", "backbone.embed_dim=32", "backbone.depth=2",
          "backbone.num_heads=2", "protocol=segment", "data=imagefolder", f"data.root={root}", f"data.masks={masks}",
          "data.num_workers=0", "data.batch_size=4", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"])
    record = json.loads((tmp_path / "vit.segment.json").read_text())
    assert record["protocol"] == "segment" and 0 <= record["segment_jaccard"] <= 100
    assert "random_segment_jaccard" in record and record["segment_missing_masks"] == 1
    assert (tmp_path / "vit.segment.png").is_file() and "segment_jaccard" in capsys.readouterr().out


def test_bad_inputs_are_one_line(tmp_path):
    root, masks = folder(tmp_path)
    with pytest.raises(UserError, match="data.masks=.* names foreground masks beside a folder dataset .* but data=digits"):
        SSLDataModule("digits", image_size=8, masks=str(masks))
    with pytest.raises(UserError, match="data.masks=.*nowhere is not a folder"):
        data(root, tmp_path / "nowhere")
    no_masks = SSLDataModule("digits", image_size=8, channels=1, num_classes=10)
    no_masks.setup("fit")
    with pytest.raises(UserError, match="data=digits has no foreground masks: use data=pets"):
        Segment().run(subject(OracleViT(), no_masks, tmp_path))
    with pytest.raises(UserError, match="protocol=segment reads a ViT's CLS attention, but ConvNet has none"):
        from src.backbones.convnet import ConvNet

        Segment().run(subject(ConvNet(3, 8, 2), data(root, masks), tmp_path))
    for mask in (masks / "val").rglob("*.png"):
        mask.unlink()
    with pytest.raises(UserError, match="none of the 8 evaluation images has a readable mask"):
        Segment().run(subject(OracleViT(), data(root, masks), tmp_path))
    with pytest.raises(ValueError, match="protocols.segment.mass=0 must be in"):
        Segment(mass=0)
