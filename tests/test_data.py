"""Folder datasets: image modes, small images, bad files (counted across workers, or an error by option)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from src.data.datamodule import SSLDataModule
from src.data.datasets import BadImageError, FolderImages, decode
from src.utils.errors import UserError

WHITE = (255, 255, 255)


def _pixels(path: Path, channels: int) -> list:
    """The decoded (2 x 2) image as a nested list [row][col] of channel tuples."""
    x = decode(str(path), 2, "L" if channels == 1 else "RGB")
    assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, 2, 2)
    return [[tuple(x[:, r, c].tolist()) for c in range(2)] for r in range(2)]


def _palette(path: Path, transparent: bool) -> None:
    im = Image.new("P", (2, 2))
    im.putpalette([200, 10, 30, 0, 128, 255] + [0] * 762)
    im.putdata([0, 1, 1, 0])
    if transparent:
        im.save(path, transparency=0)  # index 0 is the transparent colour
    else:
        im.save(path)


MODES = {  # name -> (writer, expected RGB pixels [row][col], expected L pixels)
    "L": (lambda p: Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8), "L").save(p),
          [[(0,) * 3, (100,) * 3], [(200,) * 3, (255,) * 3]], [[(0,), (100,)], [(200,), (255,)]]),
    "P": (lambda p: _palette(p, transparent=False),
          [[(200, 10, 30), (0, 128, 255)], [(0, 128, 255), (200, 10, 30)]], None),
    "P with transparency": (lambda p: _palette(p, transparent=True),
                            [[WHITE, (0, 128, 255)], [(0, 128, 255), WHITE]], None),
    "RGBA": (lambda p: Image.fromarray(np.array([[[255, 0, 0, 0], [0, 0, 255, 255]],
                                                 [[0, 0, 0, 128], [10, 20, 30, 255]]], np.uint8), "RGBA").save(p),
             [[WHITE, (0, 0, 255)], [(127,) * 3, (10, 20, 30)]], None),  # composited on white
    "LA": (lambda p: Image.fromarray(np.array([[[0, 0], [50, 255]], [[0, 255], [200, 0]]], np.uint8), "LA").save(p),
           [[WHITE, (50,) * 3], [(0,) * 3, WHITE]], [[(255,), (50,)], [(0,), (255,)]]),
    "CMYK": (lambda p: Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 0, 0], [0, 0, 0, 255]]],
                                                np.uint8), "CMYK").save(p),
             [[WHITE, (0, 255, 255)], [(255, 0, 255), (0, 0, 0)]], None),
    # 16-bit: 0..65535 scaled to 0..255 (PIL's own conversion would clip 1000 and 32896 to 255)
    "I;16": (lambda p: Image.fromarray(np.array([[0, 1000], [32896, 65535]], np.uint16)).save(p),
             [[(0,) * 3, (4,) * 3], [(128,) * 3, (255,) * 3]], [[(0,), (4,)], [(128,), (255,)]]),
    "I": (lambda p: Image.fromarray(np.array([[0, 1000], [32896, 65535]], np.int32), "I").save(p),
          [[(0,) * 3, (4,) * 3], [(128,) * 3, (255,) * 3]], [[(0,), (4,)], [(128,), (255,)]]),
    "I outside 16 bits": (lambda p: Image.fromarray(np.array([[-100, 0], [100, 155]], np.int32), "I").save(p),
                          [[(0,) * 3, (100,) * 3], [(200,) * 3, (255,) * 3]], None),  # stretched min..max
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_image_modes_decode_to_the_requested_channels(mode, tmp_path):
    write, rgb, gray = MODES[mode]
    path = tmp_path / ("image.tiff" if mode.startswith("I") or mode == "CMYK" else "image.png")
    write(path)
    stored = Image.open(path).mode
    assert stored == mode.split()[0], f"the test meant to write a {mode} file but PIL wrote {stored}"
    assert _pixels(path, 3) == rgb
    if gray is not None:
        assert _pixels(path, 1) == gray


def test_colour_to_gray_is_luma(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)).save(path)
    assert _pixels(path, 1) == [[(76,), (150,)], [(29,), (255,)]]  # ITU-R 601: 0.299 R + 0.587 G + 0.114 B


def test_images_smaller_than_the_crop_are_upsampled(tmp_path):
    path = tmp_path / "tiny.png"
    arr = np.zeros((3, 5, 3), np.uint8)
    arr[:, :, 0] = 200  # a red 5 x 3 image
    Image.fromarray(arr).save(path)
    x = decode(str(path), 16, "RGB")
    assert tuple(x.shape) == (3, 16, 16)  # shorter side 3 -> 16, then the centre 16 x 16 of 27 x 16
    assert (x[0] == 200).all() and (x[1:] == 0).all()
    ramp = tmp_path / "ramp.png"
    Image.fromarray(np.array([[0, 255]], np.uint8), "L").save(ramp)  # 2 x 1 -> 32 x 16, centre 16 x 16
    y = decode(str(ramp), 16, "L")[0]
    assert tuple(y.shape) == (16, 16) and (y[0] == y[-1]).all()
    assert y[0, 0] < y[0, -1] and bool((y[0, 1:] >= y[0, :-1]).all())  # interpolated, not blocky


def _tree(root: Path, classes=("a", "b"), n: int = 6, bad: dict[str, bytes] | None = None) -> Path:
    """root/<class>/<i>.png of flat colours, plus the ``bad`` files (relative path -> bytes)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((6, 9, 3), 40 * c + i, np.uint8)).save(root / name / f"{i}.png")
    for rel, data in (bad or {}).items():
        (root / rel).write_bytes(data)
    return root


def _broken(tmp_path: Path) -> dict[str, bytes]:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    return {"a/truncated.png": data[: len(data) - 200], "a/text.jpg": b"not an image at all",
            "b/empty.png": b""}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_replaced_and_counted_in_every_worker(num_workers, tmp_path):
    root = _tree(tmp_path / "train", bad=_broken(tmp_path))
    ds = FolderImages(str(root), 8)
    assert len(ds) == 15 and ds.skipped == {}  # nothing is opened when the dataset is built
    batches = list(DataLoader(ds, batch_size=5, num_workers=num_workers))
    images = torch.cat([x for x, _ in batches])
    assert images.shape == (15, 3, 8, 8)  # every index gives an image: bad files replaced by the next one
    assert set(ds.skipped) == {str(root / rel) for rel in ("a/truncated.png", "a/text.jpg", "b/empty.png")}
    assert all(reason for reason in ds.skipped.values())
    list(DataLoader(ds, batch_size=5, num_workers=num_workers))  # a second epoch: still three, listed once
    assert len(ds.skipped) == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_option_names_the_bad_file_in_one_line(num_workers, tmp_path):
    root = _tree(tmp_path / "train", bad={"b/broken.png": b"\x89PNG garbage"})
    ds = FolderImages(str(root), 8, skip_bad=False)
    with pytest.raises(BadImageError) as err:
        list(DataLoader(ds, batch_size=13, num_workers=num_workers))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message  # also from a worker
    assert message.startswith(f"cannot read image {root / 'b' / 'broken.png'} (")
    assert "data.skip_bad_images=false" in message


def test_folder_checks_are_one_line_errors(tmp_path):
    def check(**kwargs):
        dm = SSLDataModule(name="imagefolder", root=str(tmp_path / "d"), **kwargs)
        with pytest.raises(UserError) as err:
            dm.check_root()
        assert len(str(err.value).splitlines()) == 1
        return str(err.value)

    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "train" / "a" / "notes.txt").write_text("no images here")
    assert "no images under" in check()
    _tree(tmp_path / "d" / "train", classes=("a",), n=2)
    _tree(tmp_path / "d" / "val", classes=("a",), n=2)
    assert "has one class folder (a)" in check() and "data.labelled=false" in check()
    SSLDataModule(name="imagefolder", root=str(tmp_path / "d"), labelled=False).check_root()  # fine unlabelled
    SSLDataModule(name="imagefolder", root=str(tmp_path / "d"), val_dir=None).check_root()  # no evaluation: fine
    _tree(tmp_path / "d" / "train", classes=("b",), n=2)
    SSLDataModule(name="imagefolder", root=str(tmp_path / "d")).check_root()
    for f in (tmp_path / "d" / "val").rglob("*.png"):
        f.unlink()
    assert "no images under" in check() and "data.val_dir=null" in check()


def test_data_health_lists_skipped_files_once_per_epoch_with_workers(tmp_path, caplog):
    import lightning as L
    from hydra.utils import instantiate

    from src.callbacks.data_health import DataHealth
    from tests.helpers import tiny_cfg

    root = _tree(tmp_path / "images" / "train", bad=_broken(tmp_path))  # 15 files, 3 bad; batch 5: all visited
    cfg = tiny_cfg("simclr", "data=imagefolder", f"data.root={tmp_path / 'images'}", "data.image_size=8",
                   "data.crop_size=8", "data.batch_size=5", "data.num_workers=2", "trainer.max_epochs=2")
    L.seed_everything(0, verbose=False)  # as src/train.py does (the training order is drawn from the run seed)
    dm = instantiate(cfg.data)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    run_dir = tmp_path / "run"
    trainer = L.Trainer(**cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=run_dir, callbacks=[DataHealth()])
    with caplog.at_level(logging.WARNING, logger="src.callbacks.data_health"):
        trainer.fit(method, datamodule=dm)
    health = [cb for cb in trainer.callbacks if isinstance(cb, DataHealth)]
    listed = (run_dir / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(
        str(root / rel) for rel in ("a/truncated.png", "a/text.jpg", "b/empty.png"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "src.callbacks.data_health"]
    assert len(warnings) == 1 and "skipped 3 image file(s)" in warnings[0]  # epoch 1 found nothing new
    assert health[0].results == {"skipped_images": 3}


def test_imagefolder_takes_its_image_size_from_the_images_and_says_so(tmp_path, capsys):
    """data=imagefolder with no size: the median shorter side of the first images (48 px here, one 40x64 photo among
    them), logged once; views and the stored images follow it; a size given on the command line wins."""
    from hydra.utils import instantiate

    from src.config.compose import compose

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                w, h = (64, 40) if (split, c, i) == ("train", "a", 0) else (48, 48)
                Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(tmp_path / split / c / f"{i}.png")
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "backbone=vit_cpu", "data.batch_size=4"])
    assert (cfg.data.image_size, cfg.data.crop_size, cfg.views.crops[0].size, cfg.views.eval_size) == (48,) * 4
    assert cfg.backbone.img_size == 48 and cfg.backbone.patch_size == 4
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "data.image_size=" in ln]  # stdout: not an error
    assert lines == [f"data.image_size=48: the median shorter side of 6 images under {tmp_path}/train; "
                     "set data.image_size=<pixels> to choose another size"]
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert dm.pretrain[0][0].shape == (3, 48, 48) and dm.eval_val[0][0].shape == (3, 48, 48)

    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.image_size=32"])
    assert (cfg.data.image_size, cfg.data.crop_size, cfg.views.crops[0].size) == (32, 32, 32)


def test_a_missing_size_is_one_line_naming_what_to_set(tmp_path):
    from src.config.command_line import problems_for

    (tmp_path / "train" / "a").mkdir(parents=True)
    assert problems_for(["data=imagefolder", f"data.root={tmp_path}"])[0].startswith(f"data.root={tmp_path}: no images")
    assert problems_for(["data.image_size=null"]) == [
        "data.image_size is not set; fashion_mnist needs one: set data.image_size=<pixels>"]
