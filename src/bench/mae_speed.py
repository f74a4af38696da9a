"""`python -m src.bench.mae_speed`: how much faster MAE's encoder is when it encodes only the visible patches.

For each setting (a ViT backbone config at a crop size and a batch size), the same ViT runs a forward and
backward pass (a) on the CLS token and all L patch tokens, and (b) on the CLS token and the round(L x (1 - r))
visible ones that MAE keeps at mask ratio r (``encode(tokens, keep)``), on the same random images. The two are
timed alternately, ``--repeats`` times after ``--warmup`` untimed rounds; the table gives the median images/s of
each and their ratio (measured in one run: the machine's other load hits both alike). Absolute figures only mean
something on the machine named in the output; compare the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time

import torch
from hydra.utils import instantiate

from src.config.compose import compose
from src.nn.masks import random_masking

DEFAULT_SETTINGS = ["vit_cpu:28:256", "vit_small:224:16"]


def parse_setting(text: str) -> tuple[str, int, int]:
    try:
        backbone, size, batch = text.split(":")
        return backbone, int(size), int(batch)
    except ValueError:
        raise SystemExit(f"error: --settings entry {text!r} must be backbone:crop_size:batch, e.g. vit_small:224:16") from None


def step_seconds(backbone, x: torch.Tensor, keep: torch.Tensor | None) -> float:
    start = time.perf_counter()
    out = backbone.encode(backbone.tokens(x), keep)
    out.float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_setting(backbone_name: str, size: int, batch: int, ratio: float, repeats: int, warmup: int,
            device: torch.device) -> dict:
    cfg = compose([f"backbone={backbone_name}", "data=fake", f"data.image_size={size}", f"data.crop_size={size}"])
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone).to(device).train()
    x = torch.randn(batch, cfg.data.channels, size, size, device=device)
    grid = backbone.grid(x)
    masking = random_masking(batch, grid[0] * grid[1], ratio, device)
    times = {"all": [], "visible": []}
    for i in range(warmup + repeats):
        for name, keep in (("all", None), ("visible", masking.keep)):
            seconds = step_seconds(backbone, x, keep)
            backbone.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(seconds)
    all_s, vis_s = statistics.median(times["all"]), statistics.median(times["visible"])
    return {"backbone": backbone_name, "crop": size, "patch": backbone.patch_size, "tokens": grid[0] * grid[1],
            "visible": masking.keep.shape[1], "batch": batch, "all_img_s": batch / all_s,
            "visible_img_s": batch / vis_s, "speedup": all_s / vis_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.bench.mae_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="backbone:crop_size:batch entries")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})"
    print(f"MAE encoder, forward + backward, mask ratio {args.mask_ratio}; {where}; torch {torch.__version__}; "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}; median of {args.repeats}")
    print("| backbone | crop | patch | tokens L | visible | batch | all tokens (img/s) | visible only (img/s) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for setting in args.settings:
        r = time_setting(*parse_setting(setting), args.mask_ratio, args.repeats, args.warmup, device)
        print(f"| {r['backbone']} | {r['crop']} | {r['patch']} | {r['tokens']} | {r['visible']} | {r['batch']} "
              f"| {r['all_img_s']:.1f} | {r['visible_img_s']:.1f} | {r['speedup']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
