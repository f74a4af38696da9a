"""Hugging Face snapshots as backbones, without transformers: ``backbone=hf backbone.name=<snapshot folder or hub id>``.

A snapshot is what ``save_pretrained`` writes and what the hub holds: ``config.json`` (the architecture),
``model.safetensors`` or ``pytorch_model.bin`` (read safely, ``weights_only=True``; sharded ``*.index.json`` too) and
``preprocessor_config.json`` (resize, crop, mean, std). Read here (``model_type``):

    vit                      ViTModel (DINO's and most ViT snapshots), ViTForImageClassification
    vit_mae                  ViTMAEModel, ViTMAEForPreTraining (the decoder is not used; positions stay fixed)
    dinov2                   Dinov2Model (LayerScale; the mask token goes to ViT.add_mask_token)
    dinov2_with_registers    Dinov2WithRegistersModel (register tokens: ViT's ``reg_tokens``)
    clip, clip_vision_model  CLIPModel / CLIPVisionModel: the vision tower (LayerNorm before the blocks, QuickGELU,
                             no patch bias); CLIPModel's text tower, projections and logit scale go to method=clip

and open_clip checkpoints (a folder with ``open_clip_config.json`` and ``open_clip_model.safetensors`` /
``open_clip_pytorch_model.bin``, or such a weights file alone; its sizes are then read from the tensors, with
open_clip's 64-wide heads and GELU unless ``open_clip_config.json`` beside it says ``quick_gelu``).

The matching :class:`src.backbones.vit.ViT` (timm's VisionTransformer) is built and the names mapped: q, k and v
concatenated into timm's ``qkv``, LayerScale ``lambda1`` into ``gamma``, registers, CLIP's pre-norm; decoders,
poolers, classifiers and mask tokens that the backbone does not use are counted and left out. Both spellings of
transformers' layers are read: 4.x's ``encoder.layer.N.attention.attention.query`` (what ``save_pretrained`` writes)
and 5.x's ``layers.N.attention.q_proj`` / ``encoder.layer.N.attention.q_proj``. The stored position embedding is
resampled once to ``img_size`` as transformers' ``interpolate_pos_encoding`` does (bicubic; antialiased for DINOv2
with registers), so the features at that size are transformers' own. Grayscale data (``in_channels=1``) folds the
RGB patch projection and the snapshot's per-channel normalisation into one channel exactly: a gray image gives the
features of the RGB model on that image repeated over the 3 channels, when it is normalised with the channel means
of the snapshot's mean and std (what conf/backbone/hf.yaml sets).

A hub id is downloaded with ``huggingface_hub`` (cached as ``from_pretrained`` does) where there is internet;
offline, one line says to pass a local snapshot folder instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from src.backbones.vit import POOLS, ViT
from src.utils.errors import UserError

ARCHITECTURES = {"vit": "ViTModel", "vit_mae": "ViTMAEModel", "dinov2": "Dinov2Model",
                 "dinov2_with_registers": "Dinov2WithRegistersModel", "clip": "CLIPModel",
                 "clip_vision_model": "CLIPVisionModel"}
# transformers' hidden_act -> timm's activation names
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
BICUBIC, BILINEAR = 3, 2  # PIL's resampling codes, as preprocessor_config.json writes them

# transformers' config defaults per model_type (save_pretrained may leave out values equal to them)
VISION_DEFAULTS = {
    "vit": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                   layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                   layerscale_value=1.0, use_swiglu_ffn=False),
    "clip_vision_model": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5, image_size=224, patch_size=32,
                              num_channels=3),
}
VISION_DEFAULTS["vit_mae"] = VISION_DEFAULTS["vit"]
VISION_DEFAULTS["dinov2_with_registers"] = {**VISION_DEFAULTS["dinov2"], "patch_size": 16, "num_register_tokens": 4}
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu")


@dataclass(frozen=True)
class VisionArch:
    """The ViT a snapshot holds, in :class:`src.backbones.vit.ViT`'s terms."""

    image_size: int
    patch_size: int
    channels: int
    width: int
    depth: int
    heads: int
    mlp_ratio: float
    qkv_bias: bool = True
    layer_scale: float | None = None
    norm_eps: float = 1e-6
    act: str = "gelu"
    pre_norm: bool = False
    registers: int = 0
    antialias: bool = False  # how its library resamples the position embedding to another grid
    fixed_positions: bool = False  # MAE: fixed 2-D sine-cosine positions

    def describe(self) -> str:
        extra = [f"{self.registers} registers"] if self.registers else []
        extra += ["LayerScale"] if self.layer_scale is not None else []
        extra += ["pre-norm"] if self.pre_norm else []
        extra += [self.act] if self.act != "gelu" else []
        return (f"{self.depth} blocks x {self.width}, {self.heads} heads, patch {self.patch_size}"
                + (f" ({', '.join(extra)})" if extra else ""))


@dataclass(frozen=True)
class TextArch:
    """A CLIP text tower in open_clip's ``TextTransformer`` terms (src/nn/text.py)."""

    vocab_size: int
    context_length: int
    width: int
    heads: int
    layers: int
    mlp_ratio: float
    act: str
    output_dim: int


@dataclass(frozen=True)
class Preprocessing:
    """A snapshot's image preprocessing: resize (``("shortest", S)``: shorter side to S; ``("exact", H, W)``),
    optional centre crop (H, W), PIL resampling code, then x / 255, (x - mean) / std."""

    resize: tuple
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = BICUBIC

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images it makes."""
        if self.crop is not None:
            return self.crop
        return (self.resize[1], self.resize[1]) if self.resize[0] == "shortest" else tuple(self.resize[1:])

    def describe(self) -> str:
        resize = f"shorter side {self.resize[1]}" if self.resize[0] == "shortest" else f"{self.resize[1]}x{self.resize[2]}"
        crop = f", centre crop {self.crop[0]}x{self.crop[1]}" if self.crop else ""
        return f"resize to {resize}{crop}, mean {list(self.mean)}, std {list(self.std)}"


@dataclass
class Snapshot:
    """What :func:`open_snapshot` read: the architecture(s), the preprocessing and where the weights are."""

    name: str
    root: Path
    kind: str  # "transformers" or "open_clip"
    architecture: str  # e.g. Dinov2Model, open_clip
    vision: VisionArch
    preprocessing: Preprocessing
    text: TextArch | None = None
    weights: list[Path] = field(default_factory=list)  # the weights file(s); empty when there is none


@dataclass
class ImageText:
    """An image–text snapshot's text side for method=clip: the text tower's sizes, and the weights files when the
    backbone loaded the snapshot's weights (None: random weights); :meth:`weights` reads the text tower in
    open_clip's names (``text.net.*``), the image projection (``image_proj.weight``) and the logit scale."""

    text: TextArch
    snapshot: Snapshot
    files: list[Path] | None = None

    def weights(self) -> dict[str, Tensor] | None:
        if not self.files:
            return None
        return text_state(read_weights(self.files, self.snapshot.name), self.snapshot)[0]


# ---- finding and reading a snapshot -------------------------------------------------------------------------
def _offline_line(name: str, why: str) -> str:
    return (f"backbone.name={name} is not a local folder, and the Hugging Face hub cannot be reached to download it "
            f"({why}); download it where there is internet (huggingface-cli download {name} --local-dir DIR) and pass "
            "backbone.name=DIR, the snapshot folder")


def _hub_reachable() -> str | None:
    """None when the hub looks reachable, else why not (HF_HUB_OFFLINE, or its host does not resolve)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        host = re.sub(r"^\w+://", "", constants.ENDPOINT).split("/")[0].split(":")[0]
        socket.getaddrinfo(host, 443)
    except ImportError:
        return "huggingface_hub is not installed: pip install huggingface_hub"
    except OSError:
        return "offline"
    return None


@functools.cache
def _download(repo: str) -> Path:
    """The local folder of hub snapshot ``repo`` (config, preprocessing and weights files, cached by
    huggingface_hub)."""
    if why := _hub_reachable():
        raise UserError(_offline_line(repo, why))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    def get(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError:  # the hub did not answer and the file is not in the local cache
            raise UserError(_offline_line(repo, "no answer, and not in the local cache")) from None
        except EntryNotFoundError:  # the repository has no such file
            return None
        except RepositoryNotFoundError:
            raise UserError(f"backbone.name={repo} is not a local folder, nor a model on the Hugging Face hub (or a "
                            "private one); check the name, or pass the folder of a downloaded snapshot") from None
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            raise UserError(_offline_line(repo, type(e).__name__)) from None

    config = get("config.json") or get("open_clip_config.json")
    if config is None:
        raise UserError(f"backbone.name={repo}: the hub repository has neither config.json (transformers) nor "
                        "open_clip_config.json (open_clip); pass a snapshot of a supported model")
    get("preprocessor_config.json")
    for filename in (*WEIGHT_FILES, *OPEN_CLIP_FILES):
        if (path := get(filename)) is not None:
            if filename.endswith(".index.json"):
                for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                    get(shard)
            break
    return config.parent


def locate(name) -> Path:
    """The local folder (or weights file) of ``backbone.name``: a path as given, else a hub id downloaded."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("backbone.name is not set: pass a Hugging Face snapshot folder (config.json + model.safetensors, "
                        "as save_pretrained writes) or a hub id, e.g. backbone=hf backbone.name=facebook/dino-vits16")
    path = Path(name).expanduser()
    if path.exists():
        return path
    if HUB_ID.fullmatch(name):
        return _download(name)
    raise UserError(f"backbone.name={name} is not a folder or a file; pass a snapshot folder (config.json + "
                    "model.safetensors, as save_pretrained writes) or a hub id such as facebook/dino-vits16")


def open_snapshot(name) -> Snapshot:
    """Read the snapshot ``name`` (folder, weights file or hub id): one line (UserError) for a wrong folder, a missing
    config and an unsupported model. Cached while the folder's files are unchanged."""
    path = locate(name)
    folder = path if path.is_dir() else path.parent
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))
    return _read_snapshot(str(name), str(path), stamp)


@functools.lru_cache(maxsize=32)
def _read_snapshot(name: str, path_text: str, stamp: tuple) -> Snapshot:
    path = Path(path_text)
    folder = path if path.is_dir() else path.parent
    if (folder / "config.json").is_file():
        weights = [path] if path.is_file() else _weight_files(folder, WEIGHT_FILES)
        return _transformers_snapshot(name, folder, weights)
    if path.is_file() or (folder / "open_clip_config.json").is_file():
        weights = [path] if path.is_file() else _weight_files(folder, OPEN_CLIP_FILES)
        return _open_clip_snapshot(name, folder, weights)
    raise UserError(f"backbone.name={name} has no config.json (nor open_clip_config.json): it is not a Hugging Face "
                    "snapshot; pass the folder that save_pretrained wrote (config.json + model.safetensors)")


def _weight_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    for filename in names:
        path = folder / filename
        if path.is_file():
            if filename.endswith(".index.json"):
                shards = sorted(set(_json(path, "backbone.name").get("weight_map", {}).values()))
                return [folder / s for s in shards]
            return [path]
    return []


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: {path} is not readable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} does not hold a JSON object")
    return data


def _side(value, what: str) -> int:
    """An int, or the square side of a [h, w] / {"height", "width"} size."""
    if isinstance(value, dict):
        value = [value.get("height"), value.get("width")]
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise UserError(f"{what}={value}: only square images and patches are supported")
        value = value[0]
    return int(value)


def _activation(act: str, name: str) -> str:
    if act not in ACTIVATIONS:
        raise UserError(f"backbone.name={name}: hidden_act={act!r} is not supported; supported: "
                        f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def _transformers_snapshot(name: str, folder: Path, weights: list[Path]) -> Snapshot:
    config = _json(folder / "config.json", f"backbone.name={name}")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"backbone.name={name}: config.json has model_type={model_type!r}, which backbone=hf does not "
                        f"read; supported: {', '.join(ARCHITECTURES)} (ViT, MAE, DINOv2, CLIP)")
    vision_type = "clip_vision_model" if model_type == "clip" else model_type
    v = {**VISION_DEFAULTS[vision_type], **(config.get("vision_config") or {} if model_type == "clip" else config)}
    if v.get("use_swiglu_ffn"):
        raise UserError(f"backbone.name={name}: a DINOv2 with a SwiGLU MLP (use_swiglu_ffn, ViT-g) is not supported; "
                        "use the ViT-S/B/L snapshots")
    width = int(v["hidden_size"])
    mlp_ratio = float(v["mlp_ratio"]) if "dinov2" in model_type else int(v["intermediate_size"]) / width
    vision = VisionArch(
        image_size=_side(v["image_size"], "image_size"), patch_size=_side(v["patch_size"], "patch_size"),
        channels=int(v["num_channels"]), width=width, depth=int(v["num_hidden_layers"]),
        heads=int(v["num_attention_heads"]), mlp_ratio=mlp_ratio, qkv_bias=bool(v.get("qkv_bias", True)),
        layer_scale=float(v["layerscale_value"]) if "dinov2" in model_type else None,
        norm_eps=float(v["layer_norm_eps"]), act=_activation(v["hidden_act"], name),
        pre_norm=vision_type == "clip_vision_model", registers=int(v.get("num_register_tokens", 0)),
        antialias=model_type == "dinov2_with_registers", fixed_positions=model_type == "vit_mae")
    text = None
    if model_type == "clip":
        t = {**TEXT_DEFAULTS, **(config.get("text_config") or {})}
        text = TextArch(vocab_size=int(t["vocab_size"]), context_length=int(t["max_position_embeddings"]),
                        width=int(t["hidden_size"]), heads=int(t["num_attention_heads"]),
                        layers=int(t["num_hidden_layers"]), mlp_ratio=int(t["intermediate_size"]) / int(t["hidden_size"]),
                        act=_activation(t["hidden_act"], name), output_dim=int(config.get("projection_dim", 512)))
    prep = _transformers_preprocessing(folder, model_type, vision.image_size, name)
    return Snapshot(name, folder, "transformers", ARCHITECTURES[model_type], vision, prep, text, weights)


def _transformers_preprocessing(folder: Path, model_type: str, image_size: int, name: str) -> Preprocessing:
    """preprocessor_config.json over its image processor's defaults; without the file, the defaults of the model's
    processor (for DINOv2, the values its snapshots set: 256 px then a 224 crop, ImageNet's statistics)."""
    file = folder / "preprocessor_config.json"
    p = _json(file, f"backbone.name={name}") if file.is_file() else {}
    squash = {"height": image_size, "width": image_size}
    defaults = {  # transformers' defaults of each image processor: statistics, size, crop, resampling
        "ViTImageProcessor": (HALF, squash, None, BILINEAR),
        "BitImageProcessor": (OPENAI_CLIP, {"shortest_edge": 224}, 224, BICUBIC),
        "CLIPImageProcessor": (OPENAI_CLIP, {"shortest_edge": 224}, 224, BICUBIC),
    }
    kind = str(p.get("image_processor_type") or p.get("feature_extractor_type", "")).removesuffix("Fast")
    kind = kind.replace("FeatureExtractor", "ImageProcessor")  # older snapshots (ViTFeatureExtractor, ...)
    if kind not in defaults or not p:
        kind = ("ViTImageProcessor" if model_type in ("vit", "vit_mae") else "BitImageProcessor" if "dinov2" in
                model_type else "CLIPImageProcessor")
        if not p and kind == "BitImageProcessor":
            defaults[kind] = (IMAGENET, {"shortest_edge": 256}, 224, BICUBIC)
        if not p and kind == "CLIPImageProcessor":
            defaults[kind] = (OPENAI_CLIP, {"shortest_edge": image_size}, image_size, BICUBIC)
    stats, size, crop, resample = defaults[kind]
    size = p.get("size", size)
    if isinstance(size, int):  # older files: an int means the square side for ViT, the shorter side for the others
        size = {"height": size, "width": size} if kind.startswith("ViT") else {"shortest_edge": size}
    if not p.get("do_resize", True):
        size = {"height": image_size, "width": image_size}
    if "shortest_edge" in size:
        resize = ("shortest", int(size["shortest_edge"]))
    else:
        resize = ("exact", int(size["height"]), int(size["width"]))
    crop = p.get("crop_size", crop) if p.get("do_center_crop", crop is not None) else None
    if crop is not None:
        crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    mean, std = p.get("image_mean", stats[0]), p.get("image_std", stats[1])
    if not p.get("do_normalize", True):
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    return Preprocessing(resize, crop, tuple(float(m) for m in mean), tuple(float(s) for s in std),
                         int(p.get("resample", resample)))


def _open_clip_snapshot(name: str, folder: Path, weights: list[Path]) -> Snapshot:
    """An open_clip checkpoint: sizes from open_clip_config.json, else from the tensors' shapes."""
    file = folder / "open_clip_config.json"
    config = _json(file, f"backbone.name={name}") if file.is_file() else {}
    model, pre = config.get("model_cfg") or {}, config.get("preprocess_cfg") or {}
    vc, tc = model.get("vision_cfg") or {}, model.get("text_cfg") or {}
    if vc.get("timm_model_name") or isinstance(vc.get("layers"), list | tuple) or tc.get("hf_model_name"):
        raise UserError(f"backbone.name={name}: an open_clip model with a timm/ResNet image tower or a Hugging Face "
                        "text tower is not supported; use an open_clip ViT (ViT-B-32, ViT-B-16, ViT-L-14, ...)")
    if not config:  # sizes from the shapes (as OpenAI's build_model does), 64-wide heads
        if not weights:
            raise UserError(f"backbone.name={name} has neither open_clip_config.json nor a weights file "
                            f"({' or '.join(OPEN_CLIP_FILES)}); pass an open_clip checkpoint")
        state = read_weights(weights, name)
        if "visual.conv1.weight" not in state or "token_embedding.weight" not in state:
            raise UserError(f"backbone.name={name}: neither a transformers snapshot (no config.json beside it) nor an "
                            "open_clip ViT checkpoint (no visual.conv1.weight / token_embedding.weight)")
        conv, pos = state["visual.conv1.weight"], state["visual.positional_embedding"]
        blocks = {int(k.split(".")[3]) for k in state if k.startswith("visual.transformer.resblocks.")}
        tblocks = {int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")}
        grid = round((pos.shape[0] - 1) ** 0.5)
        vc = {"width": conv.shape[0], "patch_size": conv.shape[-1], "image_size": grid * conv.shape[-1],
              "layers": len(blocks), "mlp_ratio": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / conv.shape[0]}
        width = state["token_embedding.weight"].shape[1]
        tc = {"width": width, "heads": width // 64, "layers": len(tblocks), "vocab_size": state["token_embedding.weight"].shape[0],
              "context_length": state["positional_embedding"].shape[0],
              "mlp_ratio": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width}
        model = {"embed_dim": state["text_projection"].shape[-1]}
        rank_zero_info(f"backbone: {name} has no open_clip_config.json beside it; sizes read from its tensors, GELU "
                       "assumed (OpenAI's weights need QuickGELU: put their open_clip_config.json beside the file)")
    act = "quick_gelu" if model.get("quick_gelu") else "gelu"
    width = int(vc.get("width", 768))
    vision = VisionArch(image_size=_side(vc.get("image_size", 224), "image_size"),
                        patch_size=_side(vc.get("patch_size", 16), "patch_size"), channels=3, width=width,
                        depth=int(vc.get("layers", 12)), heads=width // int(vc.get("head_width", 64)),
                        mlp_ratio=float(vc.get("mlp_ratio", 4.0)), layer_scale=vc.get("ls_init_value"), norm_eps=1e-5,
                        act=act, pre_norm=True)
    twidth = int(tc.get("width", 512))
    text = TextArch(vocab_size=int(tc.get("vocab_size", 49408)), context_length=int(tc.get("context_length", 77)),
                    width=twidth, heads=int(tc.get("heads", 8)), layers=int(tc.get("layers", 12)),
                    mlp_ratio=float(tc.get("mlp_ratio", 4.0)), act=act, output_dim=int(model.get("embed_dim", 512)))
    size = vision.image_size
    mode = pre.get("resize_mode", "shortest")
    prep = Preprocessing(("exact", size, size) if mode == "squash" else ("shortest", size),
                         None if mode == "squash" else (size, size),
                         tuple(pre.get("mean", OPENAI_CLIP[0])), tuple(pre.get("std", OPENAI_CLIP[1])),
                         {"bilinear": BILINEAR, "bicubic": BICUBIC}.get(pre.get("interpolation", "bicubic"), BICUBIC))
    return Snapshot(name, folder, "open_clip", "open_clip", vision, prep, text, weights)


def read_weights(files: list[Path], name: str) -> dict[str, Tensor]:
    """Every tensor of the weights file(s), read safely: safetensors, or torch.load(weights_only=True)."""
    state: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"backbone.name={name}: the weights file {file} is missing (a shard listed in the index?)")
        try:
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                part = load_file(str(file))
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - safetensors and unpickling raise many types
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise UserError(f"backbone.name={name}: {file} could not be read safely ({first})") from None
        if isinstance(part, dict) and isinstance(part.get("state_dict"), dict):
            part = part["state_dict"]  # open_clip's training checkpoints
        if not isinstance(part, dict):
            raise UserError(f"backbone.name={name}: {file} holds no state dict")
        state.update({k.removeprefix("module."): v for k, v in part.items() if isinstance(v, Tensor)})
    return state


def snapshot_value(name, key: str, channels=3):
    """A value of the snapshot ``name`` for the config (the resolver ``hf_snapshot`` of conf/backbone/hf.yaml):
    ``mean`` / ``std`` of its normalisation for ``channels``-channel data (the channel mean of the three values for
    grayscale data), or its ``patch_size`` (views that round their crops to whole patches read it). Where the snapshot
    cannot be read: ImageNet's statistics, patch 16 (the backbone's own check then says what is wrong with
    backbone.name)."""
    try:
        snap = open_snapshot(name)
    except UserError:
        snap = None
    if key == "patch_size":
        return snap.vision.patch_size if snap is not None else 16
    if snap is not None:
        values = list(snap.preprocessing.mean if key == "mean" else snap.preprocessing.std)
    else:
        values = list(IMAGENET[0] if key == "mean" else IMAGENET[1])
    if channels == 1 and len(values) == 3:
        values = [sum(values) / 3]
    return values


# ---- names: transformers / open_clip -> timm's VisionTransformer and open_clip's TextTransformer --------------
# one block's parts, as each library (and version) spells them after the block index
BLOCK_PARTS = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.output.dense": "proj", "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.o_proj": "proj", "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.out_proj": "proj", "layernorm_before": "norm1", "norm1": "norm1", "layer_norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2", "layer_norm2": "norm2", "intermediate.dense": "fc1",
    "output.dense": "fc2", "mlp.fc1": "fc1", "mlp.fc2": "fc2", "layer_scale1": "ls1", "layer_scale2": "ls2",
    # open_clip
    "ln_1": "norm1", "ln_2": "norm2", "attn.out_proj": "proj", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2", "ls_1": "ls1",
    "ls_2": "ls2",
}
TIMM_PARTS = {"norm1": "norm1", "norm2": "norm2", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
              "ls1": "ls1", "ls2": "ls2"}
OPEN_CLIP_TEXT_PARTS = {"norm1": "ln_1", "norm2": "ln_2", "proj": "attn.out_proj", "fc1": "mlp.c_fc",
                        "fc2": "mlp.c_proj", "ls1": "ls_1", "ls2": "ls_2"}
BLOCK = re.compile(r"(?:encoder\.)?(?:layer|layers|transformer\.resblocks)\.(\d+)\.(.+)\.(weight|bias|lambda1|gamma|"
                   r"in_proj_weight|in_proj_bias)")


def _blocks(state: dict[str, Tensor], prefix: str, name: str) -> tuple[dict[tuple[int, str, str], Tensor], set[str]]:
    """{(block, part, weight|bias|gamma): tensor} of the blocks under ``prefix``, and the names read."""
    parts, used = {}, set()
    for key, value in state.items():
        if not key.startswith(prefix) or not (m := BLOCK.fullmatch(key[len(prefix):])):
            continue
        index, module, param = int(m.group(1)), m.group(2), m.group(3)
        if param.startswith("in_proj_"):  # open_clip's fused q/k/v (nn.MultiheadAttention)
            module, param = f"{module}.qkv", param.removeprefix("in_proj_")
        if module.endswith(".qkv"):
            part = "qkv"
        elif module in BLOCK_PARTS:
            part = BLOCK_PARTS[module]
        else:
            raise UserError(f"backbone.name={name}: {key} is a part of a transformer block that backbone=hf does not "
                            "know (another architecture, e.g. a SwiGLU MLP?)")
        parts[(index, part, "gamma" if param == "lambda1" else param)] = value
        used.add(key)
    return parts, used


def _merge_qkv(parts: dict, index: int, param: str) -> Tensor | None:
    if (index, "qkv", param) in parts:
        return parts[(index, "qkv", param)]
    found = [parts.get((index, p, param)) for p in "qkv"]
    return torch.cat(found, dim=0) if all(t is not None for t in found) else None


def _block_state(parts: dict, names: dict[str, str], qkv: str, prefix: str) -> dict[str, Tensor]:
    out = {}
    for index in sorted({i for i, _, _ in parts}):
        for param in ("weight", "bias"):
            if (fused := _merge_qkv(parts, index, param)) is not None:
                out[f"{prefix}{index}.{qkv}{'' if qkv.endswith('_') else '.'}{param}"] = fused
    for (index, part, param), value in parts.items():
        if part in names:
            out[f"{prefix}{index}.{names[part]}.{param}"] = value
    return out


def vision_state(state: dict[str, Tensor], snap: Snapshot) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the vision tower's tensors in timm's names, the other tensors by their file names). The image projection of
    an open_clip checkpoint is left among the others (``visual.proj``)."""
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor | None:
        if key in state:
            used.add(key)
            return state[key]
        return None

    if snap.kind == "open_clip":
        prefix = "visual."
        embeddings = {"cls_token": take("visual.class_embedding"), "pos_embed": take("visual.positional_embedding"),
                      "patch_embed.proj.weight": take("visual.conv1.weight")}
        norms = {"norm_pre": "visual.ln_pre", "norm": "visual.ln_post"}
    else:
        cls_key = next((k for k in state if k.endswith(("embeddings.cls_token", "embeddings.class_embedding"))
                        and not k.startswith("text_model.")), None)
        if cls_key is None:
            raise UserError(f"backbone.name={snap.name}: its weights have no class token (embeddings.cls_token / "
                            f"embeddings.class_embedding); is it a {snap.architecture} snapshot?")
        prefix = cls_key[: cls_key.index("embeddings.")]
        e = f"{prefix}embeddings."
        embeddings = {"cls_token": take(cls_key),
                      "pos_embed": take(f"{e}position_embeddings") if f"{e}position_embeddings" in state
                      else take(f"{e}position_embedding.weight"),
                      "patch_embed.proj.weight": take(f"{e}patch_embeddings.projection.weight")
                      if f"{e}patch_embeddings.projection.weight" in state else take(f"{e}patch_embedding.weight"),
                      "patch_embed.proj.bias": take(f"{e}patch_embeddings.projection.bias"),
                      "register_tokens": take(f"{e}register_tokens")}
        norms = {"norm_pre": f"{prefix}pre_layrnorm", "norm": f"{prefix}post_layernorm"
                 if f"{prefix}post_layernorm.weight" in state else f"{prefix}layernorm"}
    width = snap.vision.width
    for key, value in embeddings.items():
        if value is None:
            continue
        if key == "cls_token":
            value = value.reshape(1, 1, width)
        elif key == "pos_embed":
            value = value.reshape(1, -1, width)
        out[key] = value
    for ours, theirs in norms.items():
        for param in ("weight", "bias"):
            if (value := take(f"{theirs}.{param}")) is not None:
                out[f"{ours}.{param}"] = value
    parts, block_keys = _blocks(state, prefix, snap.name)
    used |= block_keys
    out.update(_block_state(parts, TIMM_PARTS, "attn.qkv", "blocks."))
    return out, {k: v for k, v in state.items() if k not in used}


def text_state(state: dict[str, Tensor], snap: Snapshot) -> tuple[dict[str, Tensor], set[str]]:
    """method=clip's tensors of an image–text snapshot: the text tower in open_clip's ``TextTransformer`` names under
    ``text.net.``, ``image_proj.weight`` (embed x width) and ``logit_scale``; and the file's names they come from."""
    if snap.kind == "open_clip":
        text = {k: v for k, v in state.items() if not k.startswith("visual.") and k != "logit_scale"}
        out = {f"text.net.{k}": v for k, v in text.items() if k != "attn_mask"}
        if "visual.proj" in state:
            out["image_proj.weight"] = state["visual.proj"].t()
        used = {*text, "visual.proj", "logit_scale"}
    else:
        e = "text_model.embeddings."
        out = {"text.net.token_embedding.weight": state.get(f"{e}token_embedding.weight"),
               "text.net.positional_embedding": state.get(f"{e}position_embedding.weight"),
               "text.net.ln_final.weight": state.get("text_model.final_layer_norm.weight"),
               "text.net.ln_final.bias": state.get("text_model.final_layer_norm.bias"),
               "text.net.text_projection": state["text_projection.weight"].t() if "text_projection.weight" in state
               else None,
               "image_proj.weight": state.get("visual_projection.weight")}
        parts, used = _blocks(state, "text_model.", snap.name)
        out.update(_block_state(parts, OPEN_CLIP_TEXT_PARTS, "attn.in_proj_", "text.net.transformer.resblocks."))
        used |= {k for k in state if k.startswith(("text_model.", "text_projection.", "visual_projection."))}
        used.add("logit_scale")
    if "logit_scale" in state:
        out["logit_scale"] = state["logit_scale"].reshape(())
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise UserError(f"backbone.name={snap.name}: its text tower lacks {missing[0].removeprefix('text.net.')}; is it "
                        "a complete CLIPModel snapshot?")
    return {k: v.contiguous() for k, v in out.items()}, used & set(state)


def resample_positions(pos: Tensor, grid: tuple[int, int], antialias: bool) -> Tensor:
    """(1, 1 + n, D) -> (1, 1 + h * w, D): the patch positions resampled bicubically to ``grid`` (the first, the
    class token's, kept), as transformers' ``interpolate_pos_encoding``."""
    n = pos.shape[1] - 1
    side = round(n ** 0.5)
    if side * side != n:
        raise UserError(f"a position embedding of {n} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], dim=1)


def fold_to_gray(weight: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """An RGB patch projection (D, 3, p, p) for gray input normalised with the channel means ``m``, ``s`` of
    ``mean``, ``std``: (weight (D, 1, p, p), offset (D,)) such that ``conv(gray, weight) + offset`` equals the RGB
    projection of the gray image repeated over the channels and normalised per channel. With x = s y + m:
    sum_c W_c (x - m_c) / s_c = (s sum_c W_c / s_c) y + sum_c W_c (m - m_c) / s_c."""
    m_c, s_c = torch.tensor(mean, dtype=weight.dtype), torch.tensor(std, dtype=weight.dtype)
    m, s = m_c.mean(), s_c.mean()
    gray = s * (weight / s_c.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    offset = (weight * ((m - m_c) / s_c).view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    return gray, offset


# ---- the backbone --------------------------------------------------------------------------------------------
class HFViT(ViT):
    """The ViT of a Hugging Face snapshot (or open_clip checkpoint) ``name``, with its weights when ``pretrained`` is
    set (the snapshot itself: conf/backbone/hf.yaml sets it to ``name``; or another weights file of the same
    architecture; null: the architecture with random weights, e.g. the random-init baseline). ``img_size``: the grid
    the position embedding is resampled to (default: the snapshot's crop); ``in_channels=1`` folds RGB into gray (see
    the module docstring). Everything else of the ViT API (token API, ``last_attention``, ``add_mask_token``) is
    :class:`src.backbones.vit.ViT`'s.

    ``patch_size`` is the snapshot's (conf/backbone/hf.yaml reads it so that views can round crops to whole patches;
    another value is refused). ``preprocessing`` is the snapshot's (src.embed applies it); ``image_text`` the text side
    of an image–text snapshot for method=clip (None otherwise)."""

    def __init__(self, name: str | None = None, pretrained: str | None = None, img_size: int | None = None,
                 in_channels: int | None = None, pool: str = "cls", drop_path_rate: float = 0.0,
                 patch_size: int | None = None):
        snap = open_snapshot(name)
        a = snap.vision
        img_size = int(img_size or snap.preprocessing.size[0])
        in_channels = int(in_channels or a.channels)
        for problem in _own_problems(snap, img_size, in_channels, pool, patch_size):
            raise UserError(problem)
        super().__init__(img_size=img_size, patch_size=a.patch_size, in_channels=in_channels, embed_dim=a.width,
                         depth=a.depth, num_heads=a.heads, mlp_ratio=a.mlp_ratio, qkv_bias=a.qkv_bias, pool=pool,
                         init_values=a.layer_scale, drop_path_rate=drop_path_rate, reg_tokens=a.registers,
                         norm_eps=a.norm_eps, act=a.act, pre_norm=a.pre_norm)
        self.snapshot, self.preprocessing = snap, snap.preprocessing
        self.image_text = ImageText(snap.text, snap) if snap.text is not None else None
        if pretrained:
            self.load_snapshot(str(pretrained))
        if a.fixed_positions:  # MAE keeps its sine-cosine positions fixed
            self.net.pos_embed.requires_grad_(False)

    def load_snapshot(self, source: str) -> None:
        """Load the weights of ``source`` (this snapshot's name, another snapshot or a weights file)."""
        snap = self.snapshot
        if source == snap.name:
            files = snap.weights
        elif Path(source).expanduser().is_file():
            files = [Path(source).expanduser()]
        else:
            files = open_snapshot(source).weights
        if not files:
            raise UserError(_no_weights(snap))
        state = read_weights(files, source)
        ours, rest = vision_state(state, snap)
        want = self.net.state_dict()
        if "pos_embed" in ours:
            ours["pos_embed"] = resample_positions(ours["pos_embed"], self.base_grid, snap.vision.antialias)
        weight = ours.get("patch_embed.proj.weight")
        if weight is not None and weight.shape[1] != self.in_channels:
            gray, offset = fold_to_gray(weight.float(), snap.preprocessing.mean, snap.preprocessing.std)
            ours["patch_embed.proj.weight"] = gray.to(weight.dtype)
            ours["pos_embed"] = ours["pos_embed"].clone()
            ours["pos_embed"][:, 1:] += offset.to(ours["pos_embed"].dtype)  # a constant added to every patch token
        missing = [k for k in want if k not in ours]
        shapes = [f"{k} {tuple(v.shape)} instead of {tuple(want[k].shape)}" for k, v in ours.items()
                  if k in want and v.shape != want[k].shape]
        if missing or shapes:
            detail = f"{len(missing)} missing (e.g. {missing[0]})" if missing else f"{len(shapes)} of another shape (e.g. {shapes[0]})"
            raise UserError(f"backbone.pretrained={source} does not fit the ViT of {snap.name} "
                            f"({snap.vision.describe()}): {detail}; pass weights of the same architecture")
        self.net.load_state_dict({k: v for k, v in ours.items() if k in want}, strict=True)
        mask = next((v for k, v in rest.items() if k.endswith("embeddings.mask_token")), None)
        if mask is not None:  # DINOv2's: ViT.add_mask_token starts from it (iBOT, DINOv2)
            self._file_mask_token = mask.detach().reshape(1, -1).float()
        text: set[str] = set()
        if self.image_text is not None:
            text = text_state(state, snap)[1]  # checked now, read again by method=clip
            self.image_text.files = files
        ignored = len(set(rest) - text) - (mask is not None)
        rank_zero_info(f"backbone: {snap.architecture} of {snap.name} ({snap.vision.describe()}), {len(ours)} tensors "
                       f"from {', '.join(f.name for f in files)}" + (f"; its text side ({len(text)} tensors) is for "
                                                                      "method=clip" if text else "")
                       + (f"; {ignored} not used (decoder, pooler, classifier ...)" if ignored > 0 else "")
                       + f"; its preprocessing: {snap.preprocessing.describe()}")

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        """Pre-flight: the snapshot readable (folder, config, supported model, weights), and the sizes: ``img_size``
        and every view size a multiple of its patch size."""
        b = cfg.backbone
        try:
            snap = open_snapshot(b.get("name"))
        except UserError as e:
            return [str(e)]
        pretrained = b.get("pretrained")
        if pretrained and pretrained == b.get("name") and not snap.weights:
            return [_no_weights(snap)]
        if pretrained and pretrained != b.get("name") and not Path(str(pretrained)).expanduser().exists():
            try:
                open_snapshot(pretrained)
            except UserError as e:
                return [str(e).replace("backbone.name=", "backbone.pretrained=")]
        img_size = b.get("img_size") or snap.preprocessing.size[0]
        problems = _own_problems(snap, int(img_size), int(b.get("in_channels") or snap.vision.channels), b.get("pool"),
                                 b.get("patch_size"))
        if problems:
            return problems
        from omegaconf import OmegaConf

        a = snap.vision  # the views' sizes against the patch size, by the ViT's own rule
        view = OmegaConf.create({"backbone": {"img_size": img_size, "patch_size": a.patch_size, "embed_dim": a.width,
                                              "num_heads": a.heads, "pool": b.get("pool"), "pos_embed": "learned",
                                              "reg_tokens": a.registers, "pretrained": None},
                                 "views": OmegaConf.to_container(cfg.views, resolve=True)})
        shown = f"the patch size {a.patch_size} of {snap.name}"
        return [p.replace(f"backbone.patch_size={a.patch_size}", shown) for p in ViT.config_problems(view)]


def _no_weights(snap: Snapshot) -> str:
    files = OPEN_CLIP_FILES if snap.kind == "open_clip" else WEIGHT_FILES[::2]
    return (f"backbone.name={snap.name} has no weights file ({' or '.join(files)}); pass a complete snapshot, or "
            "backbone.pretrained=null for its architecture with random weights")


def _own_problems(snap: Snapshot, img_size: int, in_channels: int, pool, patch_size=None) -> list[str]:
    problems = []
    p = snap.vision.patch_size
    if patch_size is not None and patch_size != p:
        problems.append(f"backbone.patch_size={patch_size}: the patch size of {snap.name} is {p}, fixed by its weights; "
                        "leave backbone.patch_size as backbone=hf sets it")
    if img_size % p:
        lower = img_size - img_size % p
        problems.append(f"backbone.img_size={img_size} (data.crop_size) is not a multiple of the patch size {p} of "
                        f"{snap.name}; use crops of {lower or p} or {lower + p} px (the snapshot's own preprocessing: "
                        f"{snap.preprocessing.describe()})")
    if in_channels not in (snap.vision.channels, 1):
        problems.append(f"backbone.in_channels={in_channels}: {snap.name} reads {snap.vision.channels} channels (gray "
                        "data, 1 channel, is folded in exactly); use data of that many channels")
    if pool not in POOLS:
        problems.append(f"backbone.pool={pool!r}; allowed: {', '.join(POOLS)}")
    return problems
