"""Transfer datasets read through torchvision's layouts (tiny trees built here: no dataset is downloaded), one
clear line when one is missing offline, and the domain views recipes."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from src.config.compose import compose
from src.config.rules import config_problems
from src.data.transfer import TRANSFER
from src.utils.errors import UserError


def _jpegs(folder, n, size, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i}.jpg")


def _datamodule(name, root, **overrides):
    cfg = compose([f"data={name}", f"data.root={root}", "data.download=false", "data.num_workers=0",
                   *[f"data.{k}={v}" for k, v in overrides.items()]])
    return instantiate(cfg.data)


def test_eurosat_gets_a_fixed_stratified_split(tmp_path):
    for c, name in enumerate(["AnnualCrop", "Forest", "River"]):
        _jpegs(tmp_path / "eurosat" / "2750" / name, 10, (64, 64), c)
    dm = _datamodule("eurosat", tmp_path, batch_size=4)
    dm.setup("fit")
    assert (len(dm.pretrain), len(dm.eval_train), len(dm.eval_val)) == (24, 24, 6)
    assert sorted(int(dm.eval_val[i][1]) for i in range(6)) == [0, 0, 1, 1, 2, 2]  # 20% of each class
    image, label = dm.pretrain[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 64) and 0 <= int(label) < 3
    assert dm.eval_split_names == ("train (80%)", "test (20%)")
    again = _datamodule("eurosat", tmp_path, batch_size=4)
    again.setup("fit")
    assert again.eval_val.indices == dm.eval_val.indices  # the same split every time


def test_dtd_reads_its_split_files_and_resizes_varied_images(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    for c, name in enumerate(["banded", "dotted"]):
        _jpegs(base / "images" / name, 6, (40 + 10 * c, 30), c)  # varied sizes, smaller than the stored size
    (base / "labels").mkdir(parents=True)
    for split, ids in (("train", [0, 1]), ("val", [2, 3]), ("test", [4, 5])):
        lines = [f"{name}/img_{i}.jpg" for name in ("banded", "dotted") for i in ids]
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    dm = _datamodule("dtd", tmp_path, image_size=32, crop_size=32, batch_size=4)
    dm.setup("fit")
    assert (len(dm.pretrain), len(dm.eval_val)) == (8, 4)
    assert {int(dm.eval_val[i][1]) for i in range(4)} == {0, 1}
    assert dm.pretrain[5][0].shape == (3, 32, 32) and dm.eval_split_names == ("train+val (partition 1)", "test")


@pytest.mark.parametrize("name", sorted(TRANSFER))
def test_a_missing_transfer_dataset_offline_is_one_line_saying_where_to_put_it(name, tmp_path):
    with pytest.raises(UserError) as error:
        _datamodule(name, tmp_path).check_root()
    text = str(error.value)
    assert "\n" not in text and f"data.root={tmp_path}" in text and "torchvision expects" in text
    assert "data.download=false" in text


@pytest.mark.parametrize("views", ["medical", "satellite"])
def test_domain_views_compose_on_grayscale_and_colour_data(views):
    for data in ("fashion_mnist", "fake"):
        cfg = compose([f"views={views}", f"data={data}", "method=simclr"])
        assert config_problems(cfg) == []
        out = instantiate(cfg.views)(torch.randint(0, 256, (4, cfg.data.channels, cfg.data.image_size,
                                                            cfg.data.image_size), dtype=torch.uint8))
        assert len(out) == 2 and out[0].shape[1] == cfg.data.channels
    crop = compose([f"views={views}"]).views.crops[0]
    assert crop.hue == 0 and crop.saturation == 0 and crop.gray_p == 0 and crop.solarize_p == 0
    if views == "satellite":
        assert crop.rot90_p == 0.75 and crop.vflip_p == 0.5
    else:
        assert crop.scale[0] == 0.8 and crop.rot90_p == 0 and crop.brightness <= 0.2
