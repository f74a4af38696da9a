"""`python -m src.embed [CKPT] --images DIR --out FILE [overrides]`: one embedding per image under DIR.

Every readable image under ``DIR`` (recursively) gets one row, in sorted path order, written to ``FILE``:

- ``.npy`` (float32 array) or ``.pt`` (float32 tensor), with the paths in ``FILE.paths.txt`` (one per line);
- ``.csv`` or ``.parquet`` (needs pyarrow), a ``path`` column then ``f0 .. f{D-1}``.

The model is a run checkpoint (``CKPT``: its backbone and its own preprocessing, the evaluation view of its run, as
``src.eval`` reads it), or, without one, a bare backbone from overrides: ``backbone=hf backbone.name=<snapshot>``
(its preprocessor_config.json: resize, crop, mean, std), or ``backbone=... backbone.pretrained=FILE`` (the data
group's preprocessing: ``data.image_size``, ``data.crop_size``, mean and std, e.g. ``data=imagenet`` for ImageNet
weights). ``--pool cls|mean`` picks a ViT's CLS token or its mean patch token (default: the backbone's own pooling).

Unreadable files are listed (stderr and ``FILE.skipped.txt``) and left out, never fatal. ``FILE.cache.pt`` keeps
the embeddings of each file (path, size, modification time) for this model and preprocessing, so running again on
a grown folder embeds only the new files. Nothing is written when something is wrong: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.utils.errors import UserError, one_line_errors

FORMATS = (".npy", ".pt", ".csv", ".parquet")
POOLS = ("cls", "mean")


@dataclass
class Model:
    """What embeds: the model, its views (``eval_view``), how a file becomes its uint8 input, and a description."""

    net: torch.nn.Module
    views: torch.nn.Module
    decode: object  # path -> uint8 (C, H, W)
    shape: tuple[int, int, int]
    preprocessing: str
    key: str  # names the model and its preprocessing (the cache is kept per key)


def snapshot_decode(path: str, resize: tuple, crop: tuple[int, int] | None, resample: int, mode: str) -> torch.Tensor:
    """A file as a Hugging Face image processor prepares it, as uint8 (C, H, W): shorter side to S (the longer one
    scaled and truncated, as transformers does) or an exact H x W resize, with PIL's ``resample``, then a centre
    crop."""
    from src.data.datasets import to_mode

    with Image.open(path) as im:
        im = to_mode(im, mode)
        w, h = im.size
        if resize[0] == "shortest":
            s = resize[1]
            size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        else:
            size = (resize[2], resize[1])
        im = im.resize(size, resample=resample)
        if crop is not None:
            (ch, cw), (w, h) = crop, im.size
            top, left = (h - ch) // 2, (w - cw) // 2
            im = im.crop((left, top, left + cw, top + ch))
        arr = np.asarray(im, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _square_decode(path: str, size: int, mode: str) -> torch.Tensor:
    from src.data.datasets import decode

    return decode(path, size, mode)


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def from_checkpoint(ckpt: Path) -> Model:
    """A run checkpoint's model with its run's preprocessing (images at data.image_size, its evaluation view)."""
    from src.utils.checkpointing import load_run_model

    state, method = load_run_model(ckpt, "embed needs a checkpoint of this framework, or overrides such as "
                                         "backbone=hf backbone.name=<snapshot> for a bare backbone")
    data = state["config"]["data"]
    size, channels = int(data["image_size"]), int(data["channels"])
    views = method.views
    return Model(method, views, functools.partial(_square_decode, size=size, mode="L" if channels == 1 else "RGB"),
                 (channels, size, size), f"the run's: {size} px images, evaluation view of {views.eval_size} px, "
                 f"mean {[round(v, 4) for v in views.mean.tolist()]}, std {[round(v, 4) for v in views.std.tolist()]}",
                 f"ckpt {_file_key(ckpt)}")


def from_overrides(overrides: list[str], method: bool = False) -> Model:
    """A bare backbone (random, ``backbone.pretrained=FILE``, or a snapshot ``backbone=hf``) and its preprocessing:
    a snapshot's own, else the data group's. ``method``: the configured method around it (search: method=clip with
    a CLIP snapshot's two towers)."""
    from hydra.utils import instantiate

    from src.config.compose import compose
    from src.config.rules import config_problems
    from src.data.views import Views

    cfg = _compose(compose, overrides)
    extra: list[str] = []
    if cfg.backbone.get("_target_") == "src.backbones.hf.HFViT":  # the snapshot's sizes for the checks below
        from src.backbones.hf import open_snapshot

        snap = open_snapshot(cfg.backbone.get("name"))
        prep, ch = snap.preprocessing, snap.vision.channels
        side = prep.resize[1] if prep.resize[0] == "shortest" else max(prep.resize[1:])
        extra = [f"data.image_size={max(side, *prep.size)}", f"data.crop_size={prep.size[0]}", f"data.channels={ch}"]
        cfg = _compose(compose, [*extra, *overrides])
    if cfg.data.get("image_size") is None:
        raise UserError("data.image_size is not set: a bare backbone embeds with the data group's preprocessing; set "
                        "data.image_size=<pixels> (and data.crop_size), or use data=imagenet")
    problems = config_problems(cfg)
    if problems:
        raise UserError("\n".join(problems))
    torch.manual_seed(cfg.seed)
    backbone = instantiate(cfg.backbone)
    key_parts = [json.dumps(overrides)]
    weights = cfg.backbone.get("pretrained")
    if isinstance(weights, str) and Path(weights).is_file():
        key_parts.append(_file_key(Path(weights)))
    prep = getattr(backbone, "preprocessing", None)
    if prep is not None:  # a snapshot: its own preprocessing, RGB
        channels = int(backbone.in_channels)
        key_parts += [_file_key(f) for f in backbone.snapshot.weights]
        views = Views([{"size": prep.size[0]}], list(prep.mean), list(prep.std), eval_size=None)
        decode = functools.partial(snapshot_decode, resize=prep.resize, crop=prep.crop, resample=prep.resample,
                                   mode="L" if channels == 1 else "RGB")
        net = instantiate(cfg.method, backbone=backbone, views=views).eval() if method else backbone
        return Model(net, views, decode, (channels, *prep.size), f"{backbone.snapshot.name}'s: "
                     f"{prep.describe()}", " ".join(key_parts) + f" {prep}")
    data = cfg.data
    size, channels = int(data.image_size), int(data.channels)
    views = instantiate(cfg.views)
    net = instantiate(cfg.method, backbone=backbone, views=views).eval() if method else backbone
    return Model(net, views, functools.partial(_square_decode, size=size, mode="L" if channels == 1 else "RGB"),
                 (channels, size, size), f"data={cfg.data.name}'s: {size} px images, evaluation view of "
                 f"{views.eval_size} px, mean {list(data.mean)}, std {list(data.std)}", " ".join(key_parts))


def _compose(compose, overrides: list[str]):
    from src.config.compose import config_groups, group_options

    groups = set(config_groups())
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key in groups and value not in group_options(key):
            raise UserError(f"unknown {key} '{value}'; available: {', '.join(group_options(key))}")
    try:
        return compose(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad overrides
        text = f"{e} {e.__cause__ or ''}".strip().splitlines()[0]
        raise UserError(f"the overrides {' '.join(overrides)} do not compose: {text}") from None


def pooled(model: Model, pool: str | None) -> None:
    """Switch a ViT to its CLS token or its mean patch token (``--pool``); one line for a backbone without tokens."""
    if pool is None:
        return
    from src.backbones.vit import has_token_api
    from src.protocols.features import evaluated_backbone

    backbone = evaluated_backbone(model.net)
    if not has_token_api(backbone) or not hasattr(backbone, "pool"):
        raise UserError(f"--pool {pool} picks a ViT's CLS or mean patch token, but a {type(backbone).__name__} "
                        "backbone gives pooled features only; leave --pool out")
    backbone.pool = pool
    model.key += f" pool={pool}"


def write(out: Path, paths: list[str], features: torch.Tensor) -> list[Path]:
    """The embeddings (and, for arrays, the paths beside them), each file written atomically."""
    from src.utils.io import write_text_atomic

    feats = features.float().numpy()
    suffix = out.suffix.lower()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    written = [out]
    try:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, feats)
        elif suffix == ".pt":
            torch.save(torch.from_numpy(feats), tmp)
        elif suffix == ".csv":
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["path", *(f"f{j}" for j in range(feats.shape[1]))])
                for path, row in zip(paths, feats, strict=True):
                    writer.writerow([path, *(f"{v:.8g}" for v in row)])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"path": paths, **{f"f{j}": feats[:, j] for j in range(feats.shape[1])}})
            pq.write_table(table, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if suffix in (".npy", ".pt"):
        written.append(write_text_atomic(out.with_name(out.name + ".paths.txt"), "".join(p + "\n" for p in paths)))
    return written


def output_problems(out: Path) -> list[str]:
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        return [f"--out {out}: use a file ending in {', '.join(FORMATS)}"]
    if suffix == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            return [f"--out {out}: writing parquet needs pyarrow (pip install pyarrow); or write .npy, .pt or .csv"]
    if out.is_dir():
        return [f"--out {out} is a folder; pass a file name such as {out / 'embeddings.npy'}"]
    return []


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: use auto, cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def embed(ckpt: Path | None, overrides: list[str], images: Path, out: Path, pool: str | None = None,
          batch_size: int = 64, device: str = "auto", workers: int = 2, progress: bool = True) -> dict:
    from src.protocols.folder import embed_folder

    if problems := output_problems(out):
        raise UserError("\n".join(problems))
    if not images.is_dir():
        raise UserError(f"--images {images} is not a folder; pass a folder of images (searched recursively)")
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch-size {batch_size} must be >= 1 and --workers {workers} >= 0")
    if ckpt is not None and overrides:
        raise UserError(f"{' '.join(overrides)}: a checkpoint brings its own config; overrides are for a bare "
                        "backbone (python -m src.embed --images DIR --out FILE backbone=...)")
    dev = device_of(device)
    model = from_checkpoint(ckpt) if ckpt is not None else from_overrides(overrides)
    pooled(model, pool)
    model.net.to(dev)
    start = time.time()
    key = hashlib.sha1(model.key.encode()).hexdigest()
    result = embed_folder(model.net, model.views, model.decode, model.shape, images,
                          out.with_name(out.name + ".cache.pt"), key, batch_size, dev, workers, progress)
    seconds = time.time() - start
    if not result.paths:
        raise UserError(f"--images {images}: none of its {len(result.skipped)} image file(s) could be read")
    written = write(out, result.paths, result.features)
    skipped = out.with_name(out.name + ".skipped.txt")
    if result.skipped:
        from src.utils.io import write_text_atomic

        written.append(write_text_atomic(skipped, "".join(f"{p}\t{r}\n" for p, r in result.skipped.items())))
    else:
        skipped.unlink(missing_ok=True)
    return {"rows": len(result.paths), "dim": int(result.features.shape[1]), "embedded": result.embedded,
            "cached": len(result.paths) - result.embedded, "skipped": result.skipped, "seconds": seconds,
            "files": written, "preprocessing": model.preprocessing, "device": str(dev)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="*", help="a checkpoint (outputs/<run>/checkpoints/last.ckpt), or overrides "
                                                   "for a bare backbone: backbone=hf backbone.name=<snapshot>")
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="FILE.npy, .pt, .csv or .parquet")
    parser.add_argument("--pool", choices=POOLS, default=None, help="a ViT's CLS token or mean patch token")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes (0: in this one)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_intermixed_args(argv)
    ckpt = None
    overrides = list(args.model)
    if overrides and "=" not in overrides[0]:
        ckpt = Path(overrides.pop(0))
    with one_line_errors():
        info = embed(ckpt, overrides, args.images, args.out, args.pool, args.batch_size, args.device, args.workers,
                     not args.no_progress)
    if info["skipped"]:
        shown = list(info["skipped"].items())
        print(f"skipped {len(shown)} unreadable file(s):", file=sys.stderr)
        for path, reason in shown[:20]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(shown) > 20:
            print(f"  ... and {len(shown) - 20} more (all in {info['files'][-1]})", file=sys.stderr)
    rate = info["embedded"] / info["seconds"] if info["embedded"] and info["seconds"] > 0 else None
    buf = io.StringIO()
    print(f"{info['rows']} embeddings of {info['dim']} dimensions ({info['embedded']} computed"
          + (f" at {rate:.1f} images/s on {info['device']}" if rate else "")
          + f", {info['cached']} from the cache) -> "
          f"{info['files'][0]}", file=buf)
    if len(info["files"]) > 1:
        print("beside it: " + ", ".join(str(f) for f in info["files"][1:]), file=buf)
    print(f"preprocessing: {info['preprocessing']}", file=buf)
    print(buf.getvalue(), end="", flush=True)


if __name__ == "__main__":
    main()
