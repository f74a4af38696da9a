"""`python -m src.export CKPT --format torchvision|timm|state_dict|onnx [--out FILE]`: the trained backbone alone,
with the keys its library expects (or as an ONNX graph), for use in your own code.

- ``torchvision`` (ResNet backbones): loads with ``strict=True`` into ``torchvision.models.<arch>()`` once its
  ``fc`` is ``nn.Identity()`` (and, for the CIFAR stem or grayscale data, its first conv replaced as the JSON says);
- ``timm`` (ViT backbones and ``backbone=timm``): loads with ``strict=True`` into ``timm.create_model(**create)``,
  the keyword arguments written in the JSON;
- ``state_dict`` (any backbone, the convnet included): the backbone's own state dict, for
  ``hydra.utils.instantiate(json["backbone"])``;
- ``onnx`` (any backbone; the ``[onnx]`` extra: onnx, onnxruntime, onnxscript): the backbone as an ONNX graph
  (torch.onnx's exporter, opset :data:`ONNX_OPSET`) from normalised images ``images`` (batch x C x H x W, float32,
  the batch dynamic) to ``features`` (batch x D); the JSON gives the opset, the input size, the channels and the
  normalisation to apply first. onnxruntime's features on a batch of another size than the one exported must match
  the checkpoint's backbone, else nothing is written.

The weights go to ``FILE`` (default ``<ckpt>.<format>.pt``, ``<ckpt>.onnx``; ``.safetensors`` also works) and a JSON
beside it
(``FILE`` + ``.json``) says what it is: method, backbone and its config, image size, channels, normalisation, and
how to load it. Before writing, the exported weights are loaded strict into the target library's model and its
features are compared with the checkpoint's own on a random batch; any difference is an error, and nothing is
written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from src.utils.checkpointing import atomic_torch_save
from src.utils.errors import UserError, fail
from src.utils.io import write_json_atomic

FORMATS = ("torchvision", "timm", "state_dict", "onnx")
ONNX_OPSET = 18
ONNX_TOLERANCE = dict(rtol=1e-3, atol=1e-4)  # onnxruntime's kernels against PyTorch's, float32
LIBRARY_BACKBONES = {"torchvision": {"ResNet"}, "timm": {"ViT", "TimmBackbone"}}  # state_dict: every backbone


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.detach().clone().contiguous() for k, v in state.items() if k.startswith(prefix)}


def torchvision_target(backbone_cfg: dict, channels: int) -> tuple[nn.Module, str]:
    """The torchvision ResNet the export loads into, and the code that builds it."""
    import torchvision

    arch, cifar = backbone_cfg.get("arch", "resnet18"), bool(backbone_cfg.get("cifar_stem"))
    model = getattr(torchvision.models, arch)(weights=None)
    code = [f"m = torchvision.models.{arch}(weights=None)", "m.fc = torch.nn.Identity()"]
    model.fc = nn.Identity()
    if cifar:
        model.conv1, model.maxpool = nn.Conv2d(channels, 64, 3, 1, 1, bias=False), nn.Identity()
        code += [f"m.conv1 = torch.nn.Conv2d({channels}, 64, 3, 1, 1, bias=False)", "m.maxpool = torch.nn.Identity()"]
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        code += [f"m.conv1 = torch.nn.Conv2d({channels}, 64, 7, 2, 3, bias=False)"]
    return model, "; ".join(code) + "; m.load_state_dict(weights, strict=True)"


def timm_create_kwargs(backbone_cfg: dict, backbone: nn.Module) -> dict:
    """``timm.create_model`` keyword arguments that rebuild the backbone's network."""
    target = backbone_cfg["_target_"].rsplit(".", 1)[-1]
    if target == "TimmBackbone":
        return {"model_name": backbone_cfg["name"], "pretrained": False, "num_classes": 0,
                "in_chans": int(backbone_cfg.get("in_channels", 3)), **dict(backbone_cfg.get("model_kwargs") or {})}
    net = backbone.net
    return {"model_name": "vit_base_patch16_224", "pretrained": False, "num_classes": 0,
            "global_pool": "token" if backbone.pool == "cls" else "avg", "fc_norm": False,
            "img_size": int(backbone_cfg["img_size"]), "patch_size": int(backbone.patch_size),
            "in_chans": int(net.patch_embed.proj.in_channels), "embed_dim": int(backbone.out_dim),
            "depth": len(net.blocks), "num_heads": int(backbone.num_heads), "mlp_ratio": float(backbone_cfg["mlp_ratio"]),
            "qkv_bias": bool(backbone_cfg["qkv_bias"]), "init_values": backbone_cfg.get("init_values")}


def onnx_missing() -> list[str]:
    """The packages of the [onnx] extra that are not installed."""
    import importlib.util

    return [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


def export_onnx(backbone: nn.Module, channels: int, size: int, out: Path) -> dict:
    """Write ``backbone`` as an ONNX graph to ``out`` (through a temporary file and a rename) once onnxruntime's
    features of a batch of 3 match the backbone's (exported with a batch of 2: the batch is dynamic); returns what
    the JSON says about it. A mismatch is an error and nothing is written."""
    import os
    import warnings

    import onnxruntime

    backbone = backbone.float().eval()
    if sum(p.numel() * p.element_size() for p in backbone.parameters()) > 1.9e9:
        raise UserError("--format onnx: this backbone's weights exceed 2 GB, ONNX's limit for one file")
    example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.onnx")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(backbone, (example,), str(tmp), input_names=["images"], output_names=["features"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=ONNX_OPSET,
                              dynamo=True, external_data=False, verbose=False)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = backbone(x).flatten(1)
        theirs = torch.from_numpy(session.run(["features"], {"images": x.numpy()})[0])
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, **ONNX_TOLERANCE):
            diff = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else f"shape {tuple(theirs.shape)}"
            raise UserError(f"--format onnx: onnxruntime's features differ from the checkpoint's backbone (max "
                            f"difference {diff}, tolerance {ONNX_TOLERANCE}); nothing written. This is a bug, please "
                            "report it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"onnx_opset": ONNX_OPSET, "input": {"name": "images", "shape": ["batch", channels, size, size],
                                                 "dtype": "float32"},
            "output": {"name": "features", "shape": ["batch", int(ours.shape[1])], "dtype": "float32"},
            "parity": {"batch": 3, "max_abs_difference": float((ours - theirs).abs().max()),
                       "min_cosine": float(torch.nn.functional.cosine_similarity(ours, theirs).min()), **ONNX_TOLERANCE},
            "load": "s = onnxruntime.InferenceSession(FILE); f = s.run(['features'], {'images': x})[0]  # x: float32 "
                    "(N, C, H, W) in [0, 1], then (x - mean) / std per channel"}


def export(ckpt: Path, fmt: str, out: Path | None = None) -> tuple[Path, dict]:
    from src.utils.checkpointing import epochs_trained, load_run_model

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    state, method = load_run_model(ckpt, "export needs a checkpoint of this framework that carries its config")
    config = state["config"]
    backbone, backbone_cfg, data = method.evaluated_backbone, config["backbone"], config["data"]
    kind = backbone_cfg["_target_"].rsplit(".", 1)[-1]
    fits = [f for f in FORMATS if kind in LIBRARY_BACKBONES.get(f, {kind})]
    if fmt not in fits:
        raise UserError(f"--format {fmt} does not fit a {kind} backbone; use --format {', '.join(fits[:-1])} or {fits[-1]}")
    channels = int(data.get("channels", 3))
    if fmt == "onnx" and (missing := onnx_missing()):
        raise UserError(f"--format onnx needs {', '.join(missing)}, the optional [onnx] extra: pip install -e '.[onnx]'")
    info = {"checkpoint": str(ckpt), "format": fmt, "method": config["method"]["_target_"].rsplit(".", 1)[-1],
            "backbone": backbone_cfg, "image_size": int(data.get("crop_size") or data.get("image_size")),
            "channels": channels, "mean": data.get("mean"), "std": data.get("std"), "feature_dim": int(backbone.out_dim),
            "epochs": epochs_trained(state)}
    if fmt == "onnx":
        out = out or ckpt.with_name(f"{ckpt.stem}.onnx")
        info.update(export_onnx(backbone, channels, info["image_size"], out))
        write_json_atomic(out.with_name(out.name + ".json"), info)
        return out, info
    if fmt == "state_dict":
        weights = _prefixed(backbone.state_dict(), "")
        target = type(backbone)(**{k: v for k, v in backbone_cfg.items() if k not in ("_target_", "pretrained")})
        info["load"] = ("b = hydra.utils.instantiate(info['backbone']); b.load_state_dict(weights, strict=True)"
                        "  # needs this framework (src/backbones)")
    else:
        weights = _prefixed(backbone.state_dict(), "net.")
        if fmt == "torchvision":
            target, info["load"] = torchvision_target(backbone_cfg, channels)
        else:
            import timm

            create = timm_create_kwargs(backbone_cfg, backbone)
            target = timm.create_model(**create)
            info["timm_create_model"] = create
            info["load"] = "m = timm.create_model(**info['timm_create_model']); m.load_state_dict(weights, strict=True)"
    problems = target.load_state_dict(weights, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise UserError(f"{ckpt}: the exported weights do not fit {fmt}'s model (missing {problems.missing_keys[:2]}, "
                        f"unexpected {problems.unexpected_keys[:2]}); this is a bug, please report it")
    x = torch.randn(2, channels, info["image_size"], info["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = backbone.eval()(x), target.eval()(x).flatten(1)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        raise UserError(f"{ckpt}: {fmt}'s model gives other features than the checkpoint's backbone "
                        f"(max difference {float((ours - theirs).abs().max()) if ours.shape == theirs.shape else 'shape'}); "
                        "this is a bug, please report it")
    out = out or ckpt.with_name(f"{ckpt.stem}.{fmt}.pt")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out))
    else:
        atomic_torch_save(weights, out)
    meta = out.with_name(out.name + ".json")
    write_json_atomic(meta, info)
    return out, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint of this framework (outputs/<run>/checkpoints/last.ckpt)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="whose keys the weights get")
    parser.add_argument("--out", type=Path, default=None, help="weights file (.pt or .safetensors; default beside CKPT)")
    args = parser.parse_args(argv)
    try:
        out, info = export(args.ckpt, args.format, args.out)
    except UserError as e:
        fail(str(e).splitlines())
    print(f"{info['backbone']['_target_'].rsplit('.', 1)[-1]} backbone of {info['method']} ({info['feature_dim']}-d "
          f"features, {info['image_size']} px, {info['channels']} channel(s)) -> {out}\nload: {info['load']}\n"
          f"about it: {out.with_name(out.name + '.json')}", flush=True)


if __name__ == "__main__":
    main()
