"""`python -m src.export`: the backbone alone, loading with strict=True into torchvision's ResNet and into
timm.create_model, with the checkpoint's own features; one line for a format that does not fit."""

import json

import lightning as L
import pytest
import timm
import torch
import torchvision
from hydra.utils import instantiate

from src.config.compose import compose
from src.export import main as export_main
from src.utils.checkpointing import load_checkpoint, model_from_checkpoint
from tests.helpers import tiny_cfg, to_plain

RESNET = ("method=simclr", "data=fake", "backbone=resnet18", "data.batch_size=16", "data.image_size=16",
          "data.crop_size=16", "logger=none", "eval=none", "method.proj_hidden_dim=32", "method.proj_dim=32",
          "method.warmup_epochs=0")
CASES = {"resnet_cifar_stem": lambda: compose(RESNET), "resnet": lambda: compose([*RESNET, "backbone.cifar_stem=false"]),
         "vit": lambda: tiny_cfg("simclr", "backbone.pool=mean", "backbone.pos_embed=sincos", vit=True)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A checkpoint per case: SimCLR trained for one step on fake 16 px RGB data."""
    folder, out = tmp_path_factory.mktemp("export"), {}
    for name, make_cfg in CASES.items():
        L.seed_everything(0)
        cfg = make_cfg()
        method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
        method.run_config = {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(method, datamodule=instantiate(cfg.data))
        trainer.save_checkpoint(folder / f"{name}.ckpt")
        out[name] = folder / f"{name}.ckpt"
    return out


def exported(ckpt, fmt, capsys, out=None):
    export_main([str(ckpt), "--format", fmt, *(["--out", str(out)] if out else [])])
    printed = capsys.readouterr().out
    path = printed.split(" -> ")[1].splitlines()[0]
    info = json.loads(open(path + ".json").read())
    weights = (torch.load(path, weights_only=True) if path.endswith(".pt")
               else __import__("safetensors.torch", fromlist=["load_file"]).load_file(path))
    return weights, info


def same_features(ckpt, model):
    backbone = model_from_checkpoint(load_checkpoint(ckpt)).backbone.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).flatten(1), backbone(x), rtol=1e-5, atol=1e-6)


def test_resnet_loads_strict_into_torchvision(checkpoints, capsys):
    weights, info = exported(checkpoints["resnet"], "torchvision", capsys)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(weights, strict=True)
    same_features(checkpoints["resnet"], model)
    assert info["method"] == "SimCLR" and info["feature_dim"] == 512 and info["image_size"] == 16
    assert info["mean"] and info["std"] and "strict=True" in info["load"]


def test_cifar_stem_resnet_loads_strict_as_the_json_says(checkpoints, capsys):
    weights, info = exported(checkpoints["resnet_cifar_stem"], "torchvision", capsys)
    model = torchvision.models.resnet18()
    model.fc, model.maxpool = torch.nn.Identity(), torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.load_state_dict(weights, strict=True)
    same_features(checkpoints["resnet_cifar_stem"], model)
    assert "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)" in info["load"]


def test_vit_loads_strict_into_timm_create_model(checkpoints, capsys, tmp_path):
    weights, info = exported(checkpoints["vit"], "timm", capsys, out=tmp_path / "vit.safetensors")
    model = timm.create_model(**info["timm_create_model"])
    model.load_state_dict(weights, strict=True)
    same_features(checkpoints["vit"], model)  # mean pooling and sin-cos positions carried over


def test_state_dict_export_and_a_format_that_does_not_fit(checkpoints, capsys):
    weights, info = exported(checkpoints["vit"], "state_dict", capsys)
    backbone = instantiate({k: v for k, v in info["backbone"].items() if k != "pretrained"})
    backbone.load_state_dict(weights, strict=True)
    same_features(checkpoints["vit"], backbone)
    with pytest.raises(SystemExit) as e:
        export_main([str(checkpoints["vit"]), "--format", "torchvision"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == ["error: --format torchvision does not fit a ViT backbone; use --format timm, "
                                         "state_dict or onnx"]


# ---- ONNX (the [onnx] extra) ------------------------------------------------------------------------------------
def test_onnx_graph_has_a_dynamic_batch_and_the_checkpoints_features(checkpoints, capsys, tmp_path):
    """The ViT (mean pooling, sin-cos positions) as an ONNX graph: onnxruntime's features of a batch of 5 (exported
    with 2) are the checkpoint's; the JSON says opset, input size, channels and normalisation."""
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "vit.onnx"
    export_main([str(checkpoints["vit"]), "--format", "onnx", "--out", str(out)])
    assert f"-> {out}" in capsys.readouterr().out
    info = json.loads((tmp_path / "vit.onnx.json").read_text())
    assert info["onnx_opset"] == 18 and info["input"]["shape"] == ["batch", 3, 16, 16] and info["channels"] == 3
    assert info["mean"] and info["std"] and info["parity"]["min_cosine"] > 0.9999
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    theirs = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
    backbone = model_from_checkpoint(load_checkpoint(checkpoints["vit"])).backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs, backbone(x), rtol=1e-3, atol=1e-4)


def test_onnx_mismatch_or_missing_extra_writes_nothing(checkpoints, capsys, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    import src.export

    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run", lambda self, *a, **k: [r + 0.01 for r in run(self, *a, **k)])
    out = tmp_path / "vit.onnx"
    with pytest.raises(SystemExit) as e:
        export_main([str(checkpoints["vit"]), "--format", "onnx", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "onnxruntime's features differ from the checkpoint's backbone" in err[0]
    assert list(tmp_path.iterdir()) == []  # neither the graph, nor its JSON, nor a temporary file
    monkeypatch.setattr(src.export, "onnx_missing", lambda: ["onnxruntime"])
    with pytest.raises(SystemExit):
        export_main([str(checkpoints["vit"]), "--format", "onnx", "--out", str(out)])
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --format onnx needs onnxruntime, the optional [onnx] extra: pip install -e '.[onnx]'"]
    assert list(tmp_path.iterdir()) == []
