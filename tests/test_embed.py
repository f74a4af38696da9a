"""`python -m src.embed`: every readable image of a folder in sorted path order, from a run checkpoint (its own
preprocessing) or a bare backbone (a transformers snapshot's own preprocessing); the files it writes; the cache that
makes a grown folder cost only its new files; one line for each bad input."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from src.data.datasets import decode
from src.embed import main as embed_main
from src.utils.checkpointing import load_run_model
from tests.helpers import tiny_cfg, to_plain


def image_folder(root, count=5):
    """Images of several sizes and modes in two subfolders, and one file that is not an image."""
    rng = np.random.default_rng(0)
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    for i in range(count):
        size = (20 + 3 * i, 16 + 2 * i)
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / "ab"[i % 2] / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (18, 18), dtype=np.uint8)).save(root / "a" / "gray.jpg")
    (root / "b" / "broken.png").write_bytes(b"not an image")
    return root


def run(capsys, *argv):
    embed_main([*map(str, argv), "--no-progress", "--workers", "0"])
    return capsys.readouterr()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """SimCLR on a tiny convnet, one step on fake 16 px RGB data."""
    folder = tmp_path_factory.mktemp("embed")
    cfg = tiny_cfg("simclr", "backbone.pool_grid=4")  # 16 channels x 4 x 4 = 256-d features
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    method.run_config = {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt"


def test_checkpoint_rows_in_path_order_with_its_preprocessing_and_a_cache(checkpoint, tmp_path, capsys):
    images = image_folder(tmp_path / "images")
    out = tmp_path / "out" / "features.npy"
    printed = run(capsys, checkpoint, "--images", images, "--out", out)
    paths = (tmp_path / "out" / "features.npy.paths.txt").read_text().splitlines()
    assert paths == sorted(paths) and len(paths) == 6 and not any("broken" in p for p in paths)
    features = np.load(out)
    _, method = load_run_model(checkpoint, "test")
    with torch.no_grad():  # the run's own evaluation view of its 16 px images (gray repeated to RGB)
        expected = method(method.views.eval_view(torch.stack([decode(p, 16, "RGB") for p in paths])))
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert "broken.png: UnidentifiedImageError" in printed.err and "6 embeddings of 256 dimensions" in printed.out
    assert "broken.png\t" in (tmp_path / "out" / "features.npy.skipped.txt").read_text()

    Image.new("RGB", (30, 30), (200, 10, 10)).save(images / "a" / "new.png")  # the folder grows by one image
    printed = run(capsys, checkpoint, "--images", images, "--out", out)
    assert "embedding 1 image(s)" in printed.err and "(1 computed" in printed.out and "6 from the cache" in printed.out
    grown = np.load(out)
    paths_now = (tmp_path / "out" / "features.npy.paths.txt").read_text().splitlines()
    assert len(paths_now) == 7 and paths_now == sorted(paths_now)
    np.testing.assert_array_equal(grown[[paths_now.index(p) for p in paths]], features)  # old rows kept as they were


def test_formats_carry_the_paths(checkpoint, tmp_path, capsys):
    images = image_folder(tmp_path / "images", count=2)
    rows = {}
    for suffix in (".pt", ".csv", ".parquet"):
        out = tmp_path / f"e{suffix}"
        run(capsys, checkpoint, "--images", images, "--out", out)
        if suffix == ".pt":
            rows[suffix] = torch.load(out, weights_only=True).numpy()
            assert (tmp_path / "e.pt.paths.txt").read_text().splitlines()[0].endswith("a/0.png")
        elif suffix == ".csv":
            with open(out, newline="") as f:
                table = list(csv.reader(f))
            assert table[0][:3] == ["path", "f0", "f1"] and table[1][0].endswith("a/0.png")
            rows[suffix] = np.array([[float(v) for v in r[1:]] for r in table[1:]], dtype=np.float32)
        else:
            pq = pytest.importorskip("pyarrow.parquet")
            table = pq.read_table(out)
            assert table.column_names[:2] == ["path", "f0"] and table.num_rows == 3
            rows[suffix] = np.stack([table.column(f"f{j}").to_numpy() for j in range(256)], axis=1)
    np.testing.assert_allclose(rows[".csv"], rows[".pt"], rtol=1e-6)
    if ".parquet" in rows:
        np.testing.assert_array_equal(rows[".parquet"], rows[".pt"])


def test_snapshot_backbone_embeds_as_transformers_does(tmp_path, capsys):
    """backbone=hf: the snapshot's preprocessor (shorter side 40, 32 crop, its statistics) and CLS token, against
    transformers' image processor and model on the same files; --pool mean is the mean patch token."""
    T = pytest.importorskip("transformers")
    model = T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                         image_size=32, patch_size=8)).eval()
    processor = T.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(tmp_path / "snap")
    processor.save_pretrained(tmp_path / "snap")
    images = image_folder(tmp_path / "images")
    run(capsys, "--images", images, "--out", tmp_path / "cls.npy", "backbone=hf", f"backbone.name={tmp_path / 'snap'}")
    run(capsys, "--images", images, "--out", tmp_path / "mean.npy", "--pool", "mean", "backbone=hf",
        f"backbone.name={tmp_path / 'snap'}")
    paths = (tmp_path / "cls.npy.paths.txt").read_text().splitlines()
    with torch.no_grad():
        hidden = model(**processor(images=[Image.open(p).convert("RGB") for p in paths],
                                   return_tensors="pt")).last_hidden_state
    for name, theirs in (("cls", hidden[:, 0]), ("mean", hidden[:, 1:].mean(1))):
        ours = torch.from_numpy(np.load(tmp_path / f"{name}.npy"))
        assert float(torch.nn.functional.cosine_similarity(ours, theirs).min()) >= 0.999, name


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/e.txt"], "--out {tmp}/e.txt: use a file ending in .npy, .pt, .csv, .parquet"),
    (["--images", "{tmp}/nowhere"], "--images {tmp}/nowhere is not a folder"),
    (["--images", "{tmp}/empty"], "--images {tmp}/empty: no images in it"),
    (["--pool", "mean"], "--pool mean picks a ViT's CLS or mean patch token, but a ConvNet backbone"),
    (["backbone=convnet"], "backbone=convnet: a checkpoint brings its own config"),
    (["{tmp}/nothing.ckpt"], "{tmp}/nothing.ckpt is not a file"),
    (["--parquet"], "writing parquet needs pyarrow (pip install pyarrow)"),
])
def test_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, monkeypatch, argv, message):
    images = image_folder(tmp_path / "images", count=1)
    (tmp_path / "empty").mkdir()
    given = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    args = {"--images": str(images), "--out": str(tmp_path / "e.npy")}
    if given == ["--parquet"]:
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
        args["--out"], given = str(tmp_path / "e.parquet"), []
    for key in ("--images", "--out"):
        if key in given:
            args[key] = given.pop(given.index(key) + 1)
            given.remove(key)
    source = [] if given and given[0].endswith(".ckpt") else [str(checkpoint)]
    with pytest.raises(SystemExit) as e:
        embed_main([*source, *given, *[x for kv in args.items() for x in kv], "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err[0]
    assert not any(p.name.startswith("e.") for p in tmp_path.iterdir())  # nothing written


def test_bare_backbone_with_weights_file_keys_its_cache_on_them(tmp_path, capsys):
    """backbone=... backbone.pretrained=FILE: the data group's preprocessing; new weights in the same file mean new
    embeddings, not the cached ones."""
    from src.backbones.vit import ViT

    images = image_folder(tmp_path / "images", count=2)
    weights = tmp_path / "vit.pth"
    args = ["--images", images, "--out", tmp_path / "e.npy", "backbone=vit_cpu", f"backbone.pretrained={weights}",
            "data=digits", "data.image_size=16", "data.crop_size=16", "backbone.embed_dim=32", "backbone.depth=1",
            "backbone.num_heads=2"]
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(ViT(img_size=16, patch_size=4, in_channels=1, embed_dim=32, depth=1, num_heads=2).net.state_dict(),
                   weights)
        printed = run(capsys, *args)
        assert "embedding 4 image(s)" in printed.err and "data=digits's: 16 px images" in printed.out
    assert "3 embeddings of 32 dimensions" in printed.out
