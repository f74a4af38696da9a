"""CLIP: tokenizer, loss against a naive loop, the logit scale, zero-shot and retrieval metrics, every caption
format read from small files written here (a 2-shard WebDataset included), the evaluation callback and the
search command on one trained checkpoint. (Distributed equivalence: tests/test_distributed.py.)"""

import io
import json
import math
import tarfile

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from PIL import Image

from src.callbacks.final_eval import FinalEvaluation
from src.data import captions as cap
from src.data.datamodule import SSLDataModule
from src.data.datasets import SkipLog
from src.nn.image_text import caption_relevance, retrieval_recall, zeroshot_accuracy, zeroshot_weights
from src.nn.losses import clip_loss
from src.nn.text import Tokenizer
from src.protocols.image_text import ImageText, image_text_scores
from src.search import main as search_main
from src.utils.errors import UserError
from tests.helpers import tiny_cfg, to_plain


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(context_length=12)


def test_tokenizer_round_trip_and_truncation(tokenizer):
    tokens = tokenizer(["A photo of a Dog.", "a " * 40])
    assert tokens.shape == (2, 12) and tokens.dtype == torch.long
    short, long = tokens
    assert short[0] == tokenizer.bpe.sot_token_id and (short == tokenizer.eot_id).sum() == 1
    end = int((short == tokenizer.eot_id).nonzero())
    assert torch.all(short[end + 1 :] == 0)  # zero padding after the end token
    assert tokenizer.decode(short).replace(" ", "") == "aphotoofadog."  # lower-cased, same words
    assert long[-1] == tokenizer.eot_id and torch.all(long != 0)  # cut at the context length, still ended
    assert tokenizer.decode(long).split() == ["a"] * 10
    with pytest.raises(UserError, match="context_length"):
        Tokenizer(context_length=2)


def naive_clip_loss(image, text, scale):
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    n, total = image.shape[0], 0.0
    for i in range(n):
        logits_i = [scale * float(image[i] @ text[j]) for j in range(n)]
        logits_t = [scale * float(text[i] @ image[j]) for j in range(n)]
        total += -logits_i[i] + math.log(sum(math.exp(v) for v in logits_i))
        total += -logits_t[i] + math.log(sum(math.exp(v) for v in logits_t))
    return total / (2 * n)


def test_clip_loss_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    t = torch.tensor(math.log(1 / 0.07))
    expected = naive_clip_loss(image.double(), text.double(), math.exp(float(t)))
    for local in (True, False):  # at world size 1 both variants are the plain loss
        assert float(clip_loss(image, text, t, gather=True, local=local)) == pytest.approx(expected, rel=1e-5)


def test_logit_scale_is_learned_and_clamped():
    torch.manual_seed(0)
    cfg = tiny_cfg("clip", "method.init_temperature=0.0675", "method.max_logit_scale=15.0")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    assert float(method.logit_scale.detach().exp()) == pytest.approx(1 / 0.0675, rel=1e-5)
    assert method.logit_scale in {p for g in method.param_groups() for p in g["params"] if g.get("weight_decay") == 0.0}
    L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(method, datamodule=instantiate(cfg.data))
    scale = float(method.logit_scale.detach().exp())
    assert scale != pytest.approx(1 / 0.0675, rel=1e-6) and scale <= 15.0 + 1e-4  # moved, and at most the clamp


def test_zeroshot_weights_are_the_normalised_mean_of_the_template_embeddings(tokenizer):
    torch.manual_seed(0)
    encoder = torch.nn.EmbeddingBag(49408, 8, mode="mean")
    templates = ["a photo of a {}.", "a picture of the {}."]
    weights = zeroshot_weights(encoder, tokenizer, ["cat", "dog"], templates)
    for c, name in enumerate(["cat", "dog"]):
        emb = F.normalize(encoder(tokenizer([t.format(name) for t in templates])), dim=-1)
        torch.testing.assert_close(weights[c], F.normalize(emb.mean(0), dim=0))
    images = torch.stack([weights[1], weights[0], weights[1]])  # each image is exactly a class's weight
    assert zeroshot_accuracy(images, torch.tensor([1, 0, 1]), weights) == {"zeroshot_top1": 100.0}


def test_retrieval_recall_counts_any_relevant_item():
    texts, relevant = caption_relevance([("a", "b"), ("c",), ("a",)])  # "a" describes images 0 and 2
    assert texts == ["a", "b", "c"] and relevant.tolist() == [[True, True, False], [False, False, True], [True, False, False]]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    r = retrieval_recall(image, text, relevant, ks=(1, 2))
    # image->text top-1: 0 -> b (relevant), 1 -> c (relevant), 2 -> c (not; a comes second); text->image: a -> 0,
    # b -> 0, c -> 1 or 2: all relevant
    assert r["i2t_r1"] == pytest.approx(200 / 3, rel=1e-5) and r["i2t_r2"] == 100.0
    assert r["t2i_r1"] == 100.0


# ---- caption data --------------------------------------------------------------------------------
def png_bytes(value: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size + 4), (value, 255 - value, 40)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Ten images (one unreadable) with captions in every supported format."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    for i in range(10):
        (root / "img" / f"{i}.png").write_bytes(png_bytes(20 * i) if i != 3 else b"not an image")
    rows = [(f"img/{i}.png", f"picture number {i}") for i in range(10)] + [("img/0.png", "another caption of zero"),
                                                                         ("img/1.png", "  ")]
    (root / "pairs.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (root / "pairs.tsv").write_text("image\ttext\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"filepath": p, "title": c}) + "\n" for p, c in rows))
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(10)],
            "annotations": [{"image_id": int(p.split("/")[1][0]), "caption": c} for p, c in rows]}
    (root / "captions.json").write_text(json.dumps(coco))
    for s in range(2):  # two WebDataset shards of 4 samples: one with an empty caption, one undecodable
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for i in range(4):
                key = f"{s}{i:03d}"
                caption = "" if (s, i) == (0, 1) else f"shard {s} sample {i}"
                image = b"broken" if (s, i) == (1, 2) else png_bytes(30 * i + s)
                for name, data in ((f"{key}.png", image), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.mark.parametrize("name, keys, base", [("pairs.csv", None, None), ("pairs.tsv", ["image", "text"], None),
                                              ("pairs.jsonl", None, None), ("captions.json", None, "img")])
def test_caption_files_group_captions_per_image(pair_files, name, keys, base):
    pairs, empty = cap.read_caption_file(str(pair_files / name), str(pair_files / base) if base else None, *(keys or []))
    assert len(pairs) == 10 and len(empty) == 1 and empty[0].endswith(" 12")  # the last row's caption is blank
    by_name = {p.rsplit("/", 1)[1]: c for p, c in pairs}
    assert by_name["0.png"] == ("picture number 0", "another caption of zero") and by_name["1.png"] == ("picture number 1",)


def test_caption_file_errors_are_one_line(pair_files):
    with pytest.raises(UserError, match="no column 'filepath'"):
        cap.read_caption_file(str(pair_files / "pairs.tsv"))
    with pytest.raises(UserError, match="no such file"):
        cap.read_caption_file(str(pair_files / "missing.csv"))
    with pytest.raises(UserError, match="unknown caption file type"):
        cap.caption_format("pairs.parquet")


def caption_datamodule(captions: str, **kwargs) -> SSLDataModule:
    kwargs = {"held_out_pairs": 2, **kwargs}
    dm = SSLDataModule("captions", captions=captions, image_size=16, channels=3, num_classes=None, batch_size=2,
                       eval_batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def test_caption_file_datamodule_holds_out_pairs_and_skips_bad_images(pair_files):
    dm = caption_datamodule(str(pair_files / "pairs.csv"))
    assert len(dm.pretrain) == 8 and len(dm.pairs) == 2  # held_out_pairs=2 (at most a fifth of the 10 images)
    held = dm.pairs.samples[0][0]
    assert held not in [p for p, _ in dm.pretrain.samples]
    dm.tokenizer = Tokenizer(16)
    seen = set()
    for epoch in range(3):
        dm.pretrain.set_epoch(epoch)
        for images, labels, tokens in dm.train_dataloader():
            assert images.shape == (2, 3, 16, 16) and tokens.shape == (2, 16) and torch.all(labels == -1)
            seen |= {dm.tokenizer.decode(t) for t in tokens}
    assert any("another caption" in s for s in seen) or "img/0.png" in held  # image 0 shows both captions over epochs
    assert any(p.endswith("3.png") for p in dm.skipped_images())  # the unreadable file was recorded
    images, _, caps = next(iter(dm.pairs_dataloader()))
    assert images.shape[0] == 2 and isinstance(caps[0], tuple)


def test_caption_choice_depends_on_seed_index_and_epoch_only():
    choice, captions = cap.CaptionChoice(), tuple("abcde")

    def pick(seed, index, epoch):
        choice.seed = seed
        choice.set_epoch(epoch)
        return choice.caption(index, captions)

    draws = {pick(0, 5, e) for e in range(20)}
    assert len(draws) > 1 and pick(0, 5, 3) == pick(0, 5, 3)


def test_webdataset_shards_stream_with_the_last_shard_held_out(pair_files):
    dm = caption_datamodule(str(pair_files / "shard-{0..1}.tar"), held_out_pairs=10)
    assert dm.num_samples == 4  # the first shard's 4 image keys (one has an empty caption: skipped when read)
    assert [c for _, _, c in dm.pairs] == [("shard 1 sample 0",), ("shard 1 sample 1",), ("shard 1 sample 3",)]
    dm.tokenizer = Tokenizer(16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(b[0].shape == (2, 3, 16, 16) and b[2].shape == (2, 16) for b in batches)
    # the stream decodes only the samples it yields (which ones depends on the shards drawn), so shard 0's empty
    # caption is checked by reading that shard in order, as the held-out reader does
    log = SkipLog()
    assert len(list(cap.web_pairs([str(pair_files / "shard-0.tar")], 16, 3, log._record))) == 3
    skipped = {**dm.skipped_images(), **log.skipped}
    assert any("1002" in k for k in skipped) and any("0001" in k and "empty caption" in v for k, v in skipped.items())
    with pytest.raises(UserError, match="does not exist"):
        caption_datamodule(str(pair_files / "shard-{0..5}.tar"))


def test_class_prompts_caption_labelled_data():
    dm = SSLDataModule("digits", image_size=8, channels=1, batch_size=8, captions="class_prompts",
                       prompt_templates=["a digit {}.", "the number {}."])
    dm.setup("fit")
    image, label, caption = dm.pretrain[0]
    assert caption in {f"a digit {dm.zeroshot_class_names()[label]}.", f"the number {dm.zeroshot_class_names()[label]}."}
    assert dm.pairs[0][2] == tuple(t.format(dm.zeroshot_class_names()[dm.pairs[0][1]]) for t in dm.prompt_templates)
    with pytest.raises(UserError, match="one name per class"):
        bad = SSLDataModule("digits", image_size=8, channels=1, captions="class_prompts", class_names=["a", "b"])
        bad.setup("fit")


# ---- a trained checkpoint: evaluation callback and search ------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP trained for 6 steps on fake data with class prompts, saved as a checkpoint."""
    folder = tmp_path_factory.mktemp("clip")
    cfg = tiny_cfg("clip")
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    method.run_config = {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}
    dm = instantiate(cfg.data)
    evaluation = FinalEvaluation(random_model=lambda: instantiate(
        cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views)), k=10, linear_epochs=5,
        protocol_settings={"image_text": ImageText(max_pairs=64, num_pictures=2)})
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                        callbacks=[evaluation])
    trainer.fit(method, datamodule=dm)
    trainer.save_checkpoint(folder / "last.ckpt")
    return method, dm, evaluation, folder


def test_evaluation_reports_zero_shot_retrieval_and_a_random_baseline(trained):
    method, dm, evaluation, folder = trained
    r = evaluation.results
    for key in ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "i2t_r10", "t2i_r1", "random_zeroshot_top1", "random_i2t_r1"):
        assert 0.0 <= r[key] <= 100.0, key
    assert r["retrieval_images"] == 64 and r["retrieval_texts"] == 10 * len(dm.prompt_templates)
    assert (folder / "pictures" / "image_text_0001.png").is_file()
    again = image_text_scores(method, method.views, dm, method.device, max_pairs=64)
    assert {k: round(v, 2) for k, v in again.items() if k.startswith(("zero", "i2t"))} == {
        k: v for k, v in r.items() if k.startswith(("zero", "i2t"))}  # the callback left the model as it was


def test_search_finds_images_and_caches_their_embeddings(trained, tmp_path, capsys):
    _, _, _, folder = trained
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (24, 20), (50 * i, 0, 0)).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"nope")
    ckpt = folder / "last.ckpt"
    search_main([str(ckpt), "--images", str(images), "--query", "a photo of a pattern 3.", "--top", "3"])
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln[:2].strip().rstrip(".").isdigit()]
    assert len(lines) == 3 and "embedding 6 image(s)" in out.err and "skipped 1 unreadable" in out.err
    sheet = out.out.strip().splitlines()[-1].split(": ", 1)[1]
    assert Image.open(sheet).size[0] > 3 * 112
    (images / "5.png").write_bytes(png_bytes(7))
    search_main([str(ckpt), "--images", str(images), "--query", "a photo of a pattern 1."])
    assert "embedding 1 image(s) of" in capsys.readouterr().err  # only the new file (the broken one is known)


@pytest.mark.parametrize("args, message", [
    (["--query", "  "], "--query is empty"),
    (["--images", "{empty}"], "no images in it"),
    (["--ckpt", "{not_clip}"], "not an image–text one"),
])
def test_search_bad_input_is_one_line(trained, tmp_path, capsys, args, message):
    _, _, _, folder = trained
    (tmp_path / "empty").mkdir()
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    argv = {"ckpt": str(folder / "last.ckpt"), "--images": str(images), "--query": "a shoe"}
    given = dict(zip(args[::2], args[1::2], strict=True))
    if given.get("--ckpt") == "{not_clip}":
        given["ckpt"] = str(not_clip_checkpoint(tmp_path))
        del given["--ckpt"]
    argv.update({k: v.replace("{empty}", str(tmp_path / "empty")) for k, v in given.items()})
    with pytest.raises(SystemExit) as e:
        search_main([argv.pop("ckpt"), *[x for kv in argv.items() for x in kv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def not_clip_checkpoint(folder):
    cfg = tiny_cfg("simclr")
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    state = {"state_dict": method.state_dict(), "config": {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}}
    torch.save(state, folder / "simclr.ckpt")
    return folder / "simclr.ckpt"
