"""backbone=hf: transformers snapshots (and open_clip checkpoints) read without transformers, checked against
transformers' own forward on random-weight snapshots of each architecture (saved with save_pretrained here); the
text tower of CLIP in method=clip; attention maps; grayscale folding; continued pre-training and reloading a run;
one line for each bad snapshot. transformers is a test-only dependency (the dev extra)."""

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from src.backbones.hf import HFViT
from src.config.compose import compose
from src.config.rules import config_problems
from src.utils.checkpointing import load_run_model
from src.utils.errors import UserError
from tests.helpers import to_plain

T = pytest.importorskip("transformers")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
COSINE = 0.9999


def randomised(model):
    """Every parameter moved off its initial value (LayerNorm 1/0, zero tokens), so no mapping error hides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make(kind: str, image_size: int = 224):
    """A tiny transformers model of ``kind`` (random weights) at ``image_size`` px."""
    if kind == "vit":
        return T.ViTModel(T.ViTConfig(**SMALL, intermediate_size=64, image_size=image_size, patch_size=16))
    if kind == "vit_mae":  # the pre-training model: its decoder is not part of the backbone
        return T.ViTMAEForPreTraining(T.ViTMAEConfig(**SMALL, intermediate_size=64, image_size=image_size, patch_size=16,
                                                     mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                                     decoder_num_attention_heads=2, decoder_intermediate_size=32))
    if kind == "dinov2":  # stored at 518 px (37 x 37 positions), read at 224: the positions are resampled
        return T.Dinov2Model(T.Dinov2Config(**SMALL, mlp_ratio=2, image_size=518, patch_size=14, layerscale_value=0.5))
    if kind == "dinov2_with_registers":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, image_size=518, patch_size=14,
                                                                       num_register_tokens=4))
    vision = dict(**SMALL, intermediate_size=64, image_size=image_size, patch_size=32)
    if kind == "clip_vision_model":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**vision))
    return T.CLIPModel(T.CLIPConfig(text_config=dict(**SMALL, intermediate_size=64), vision_config=vision,
                                    projection_dim=16))


def cls_features(kind: str, model, x):
    """transformers' CLS feature (after the final LayerNorm; CLIP: the post-LayerNorm pooled output)."""
    if kind == "clip":
        return model.vision_model(pixel_values=x).pooler_output
    if kind == "clip_vision_model":
        return model(pixel_values=x).pooler_output
    if kind == "vit_mae":  # noise = position: no shuffle, nothing masked (mask_ratio 0)
        return model.vit(pixel_values=x, noise=torch.arange(196.0).expand(x.shape[0], -1)).last_hidden_state[:, 0]
    return model(pixel_values=x).last_hidden_state[:, 0]


def saved(model, folder):
    model.save_pretrained(folder)
    return str(folder)


def cosine(a, b) -> float:
    return float(F.cosine_similarity(a, b).min())


@pytest.mark.parametrize("kind", ["vit", "vit_mae", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model"])
def test_cls_features_match_transformers(kind, tmp_path):
    model = randomised(make(kind))
    folder = saved(model, tmp_path)
    ours = HFViT(folder, pretrained=folder, img_size=224).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert cosine(ours(x), cls_features(kind, model, x)) >= COSINE
    assert ours.snapshot.architecture == {"vit_mae": "ViTMAEModel"}.get(kind, type(model).__name__)


def test_both_key_spellings_and_pytorch_model_bin(tmp_path):
    """transformers 5 keeps q_proj/k_proj/v_proj layers in memory (4.x: attention.attention.query ..., what
    save_pretrained writes); pytorch_model.bin is read with weights_only=True."""
    from safetensors.torch import save_file

    model = randomised(make("vit"))
    disk = saved(model, tmp_path / "disk")
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / "config.json").write_text((tmp_path / "disk" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(memory / "model.safetensors"))
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "disk" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = cls_features("vit", model, x)
        for folder in (disk, memory, pickled):
            assert cosine(HFViT(str(folder), pretrained=str(folder)).eval()(x), ref) >= COSINE, folder


def test_clip_snapshot_brings_both_towers_into_method_clip(tmp_path):
    model = randomised(make("clip"))
    folder = saved(model, tmp_path)
    cfg = compose(["method=clip", "backbone=hf", f"backbone.name={folder}", "data=fake", "data.image_size=224",
                   "data.crop_size=224", "data.captions=class_prompts"])
    assert [p for p in config_problems(cfg) if "backbone" in p] == []
    clip = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views)).eval()
    x = torch.randn(2, 3, 224, 224)
    tokens = clip.tokenizer(["a photo of a dog.", "a diagram of a bridge at night"])
    pooled = lambda out: out if torch.is_tensor(out) else out.pooler_output  # noqa: E731 - transformers 4 / 5
    with torch.no_grad():
        assert cosine(clip.encode_image(x), pooled(model.get_image_features(pixel_values=x))) >= COSINE
        assert cosine(clip.encode_text(tokens), pooled(model.get_text_features(input_ids=tokens))) >= COSINE
    assert float(clip.logit_scale) == pytest.approx(float(model.logit_scale))
    assert clip.text.out_dim == 16 and cfg.data.mean == list(model.config.to_dict().get("image_mean", [
        0.48145466, 0.4578275, 0.40821073]))  # CLIP's statistics (the snapshot has no preprocessor file: defaults)


@pytest.mark.parametrize("with_config", [True, False])
def test_open_clip_checkpoint_brings_both_towers(tmp_path, with_config):
    """A folder with open_clip_config.json (QuickGELU as OpenAI's), or the weights file alone (sizes from the
    tensors with 64-wide heads, GELU)."""
    import open_clip

    model_cfg = dict(embed_dim=16, quick_gelu=with_config,
                     vision_cfg=dict(image_size=224, layers=2, width=64, patch_size=32, head_width=32 if with_config else 64),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2 if with_config else 1, layers=2))
    reference = randomised(open_clip.model.CLIP(**model_cfg))
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    if with_config:
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    name = str(tmp_path if with_config else tmp_path / "open_clip_pytorch_model.bin")
    cfg = compose(["method=clip", "backbone=hf", f"backbone.name={name}", "data=fake", "data.image_size=224",
                   "data.crop_size=224", "data.captions=class_prompts"])
    clip = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views)).eval()
    x = torch.randn(2, 3, 224, 224)
    tokens = clip.tokenizer(["a photo of a cat.", "two trees"])
    with torch.no_grad():
        assert cosine(clip.encode_image(x), reference.encode_image(x, normalize=True)) >= COSINE
        assert cosine(clip.encode_text(tokens), reference.encode_text(tokens, normalize=True)) >= COSINE


def test_last_attention_is_transformers_attention(tmp_path):
    """DINOv2 with registers: the last block's CLS attention over the patches (registers and CLS left out,
    renormalised), per head, as transformers' eager attention probabilities."""
    config = T.Dinov2WithRegistersConfig(**SMALL, mlp_ratio=2, image_size=224, patch_size=16, num_register_tokens=4)
    config._attn_implementation = "eager"
    model = randomised(T.Dinov2WithRegistersModel(config))
    folder = saved(model, tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        probs = model(pixel_values=x, output_attentions=True).attentions[-1][:, :, 0, 5:]  # B x heads x 196
        probs = probs / probs.sum(-1, keepdim=True)
        ours = HFViT(folder, pretrained=folder).eval().last_attention(x)
    torch.testing.assert_close(ours, probs.reshape(2, 2, 14, 14), atol=1e-5, rtol=1e-4)


def test_gray_data_folds_the_rgb_projection_exactly(tmp_path):
    """A gray image normalised with the channel means of the snapshot's mean and std (what backbone=hf gives
    1-channel data) has the RGB model's features of that image repeated over 3 channels."""
    folder = saved(randomised(make("dinov2")), tmp_path)
    rgb, gray = HFViT(folder, pretrained=folder).eval(), HFViT(folder, pretrained=folder, in_channels=1).eval()
    mean, std = torch.tensor(rgb.preprocessing.mean).view(1, 3, 1, 1), torch.tensor(rgb.preprocessing.std).view(1, 3, 1, 1)
    g = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(gray((g - mean.mean()) / std.mean()), rgb((g.repeat(1, 3, 1, 1) - mean) / std),
                                   atol=1e-5, rtol=1e-4)
    cfg = compose(["backbone=hf", f"backbone.name={folder}", "data=digits", "data.image_size=28", "data.crop_size=28"])
    assert cfg.data.mean == pytest.approx([sum(rgb.preprocessing.mean) / 3])
    assert cfg.views.std == pytest.approx([sum(rgb.preprocessing.std) / 3])


def test_continued_pretraining_and_the_run_checkpoint(tmp_path):
    """method=dino and method=mae train on a snapshot's ViT (the pre-flight check passes; DINOv2's views round their
    local crops to the snapshot's patch size), and a run's checkpoint is rebuilt with the snapshot's architecture and
    the checkpoint's weights."""
    model = T.Dinov2Model(T.Dinov2Config(**SMALL, mlp_ratio=2, image_size=32, patch_size=8))
    T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    folder = saved(randomised(model), tmp_path)
    common = ["backbone=hf", f"backbone.name={folder}", "data=fake", "data.image_size=32", "data.crop_size=32",
              "data.batch_size=8", "logger=none", "eval=none"]
    for method, extra in (("dino", ["views.crops.2.size=16", "views.local_crops=2", "method.out_dim=64",
                                    "method.hidden_dim=32", "method.bottleneck_dim=16"]),
                          ("mae", ["method.decoder_dim=16", "method.decoder_depth=1", "method.decoder_heads=2"])):
        cfg = compose([f"method={method}", *common, *extra])
        assert config_problems(cfg) == [], method
        L.seed_everything(0)
        ssl = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
        before = ssl.backbone.net.blocks[0].attn.qkv.weight.detach().clone()
        ssl.run_config = {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}
        trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(ssl, datamodule=instantiate(cfg.data))
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        assert not torch.equal(before, ssl.backbone.net.blocks[0].attn.qkv.weight)  # the backbone trained
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert config_problems(compose(["method=dinov2", *common])) == []  # its local crops round to the snapshot's patch
    _, again = load_run_model(tmp_path / "last.ckpt", "test")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone(x), ssl.eval().backbone(x))


def one_line(tmp_path, name, **backbone):
    """The pre-flight's lines about backbone=hf backbone.name=NAME."""
    overrides = [f"backbone.{k}={'null' if v is None else v}" for k, v in backbone.items()]
    cfg = compose(["backbone=hf", f"backbone.name={name}", "data=digits", "data.image_size=32", "data.crop_size=32",
                   *overrides])
    lines = [p for p in config_problems(cfg) if "backbone" in p]
    assert len(lines) == 1, lines
    with pytest.raises(UserError) as e:  # the constructor says the same
        HFViT(str(name), **{"pretrained": str(name), **backbone})
    assert str(e.value) == lines[0]
    return lines[0]


def test_bad_snapshots_are_one_line_each(tmp_path, monkeypatch):
    assert "is not a folder or a file" in one_line(tmp_path, tmp_path / "missing" / "snapshot")
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in one_line(tmp_path, tmp_path / "empty")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    assert "model_type='bert', which backbone=hf does not read; supported: vit, vit_mae" in \
        one_line(tmp_path, tmp_path / "bert")
    (tmp_path / "config_only").mkdir()
    make("vit", 32).config.save_pretrained(tmp_path / "config_only")
    assert "has no weights file" in one_line(tmp_path, tmp_path / "config_only")
    assert "the patch size of" in one_line(tmp_path, tmp_path / "config_only", pretrained=None, patch_size=8)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line(tmp_path, "some-org/some-model")
    assert "not a local folder, and the Hugging Face hub cannot be reached" in line and "backbone.name=DIR" in line


def test_clip_snapshot_evaluates_zero_shot_and_searches(tmp_path, capsys, monkeypatch):
    """python -m src.eval method=clip backbone=hf ... (no checkpoint) reports zero-shot and retrieval figures;
    python -m src.search runs on the same snapshot."""
    from PIL import Image

    from src.eval import main as eval_main
    from src.search import main as search_main

    vision = dict(**SMALL, intermediate_size=64, image_size=32, patch_size=8)
    model = T.CLIPModel(T.CLIPConfig(text_config=dict(**SMALL, intermediate_size=64), vision_config=vision,
                                     projection_dim=16))
    folder = saved(randomised(model), tmp_path / "clip")
    monkeypatch.chdir(tmp_path)  # search's cache for a snapshot goes under ./outputs/search
    eval_main(["method=clip", "backbone=hf", f"backbone.name={folder}", "data=fake", "data.image_size=32",
               "data.crop_size=32", "data.captions=class_prompts", "eval.final.linear_epochs=2",
               "eval.final.holdout_fraction=0", "eval.final.random_baseline=false"])
    results = json.loads((tmp_path / "clip.eval.json").read_text())
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "knn_top1"):
        assert 0 <= results[key] <= 100, key
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (80 * i, 30, 200 - 60 * i)).save(images / f"{i}.png")
    search_main(["method=clip", "backbone=hf", f"backbone.name={folder}", "--images", str(images), "--query",
                 "a photo of a pattern 1.", "--top", "2"])
    out = capsys.readouterr()
    assert "embedding 3 image(s)" in out.err and 'top 2 for "a photo of a pattern 1."' in out.out
    assert list((tmp_path / "outputs" / "search").glob("*.png"))


def test_hub_id_downloads_the_snapshot_files(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub.hf_hub_download (here answering from a local folder, as its cache
    would): config, preprocessing, then the first weights file the repository has."""
    import shutil

    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    import src.backbones.hf as hf

    model = randomised(make("vit", 32))
    saved(model, tmp_path / "hub")
    asked = []

    def download(repo, filename, **kwargs):
        asked.append(filename)
        if not (tmp_path / "hub" / filename).is_file():
            raise EntryNotFoundError(f"{repo} has no {filename}")
        (tmp_path / "cache").mkdir(exist_ok=True)
        return shutil.copy(tmp_path / "hub" / filename, tmp_path / "cache" / filename)

    monkeypatch.setattr(hf, "_hub_reachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    ours = HFViT("test-org/tiny-vit", pretrained="test-org/tiny-vit", img_size=32).eval()
    assert asked == ["config.json", "preprocessor_config.json", "model.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert cosine(ours(x), model(pixel_values=x).last_hidden_state[:, 0]) >= COSINE
