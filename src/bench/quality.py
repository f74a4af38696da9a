"""`python -m src.bench.quality`: pre-train every method on real Fashion-MNIST under one CPU budget, one
after another, and write a results page (default docs/results.md).

Methods that need colour images (colorization, split-brain) run on CIFAR-10 instead, when it is on disk
(``--extra data.root=...``); where it is not, their rows say so and nothing is run or made up. An entry
``method@backbone`` runs a method on another backbone: the masked methods (MAE, BEiT) and DINO and MoCo v3
run on the CPU-sized ViT (``vit_cpu``), against a random-init ViT of the same size; BEiT reads the visual
tokenizer that the ``vqvae`` entry trains first.

Each method runs as a user would run it, ``python -m src.train method=<m> data=<fashion_mnist|cifar10>
backbone=<convnet|vit_cpu> trainer.max_epochs=E data.max_train_samples=N seed=S logger=csv
hydra.run.dir=<out>/<entry>`` plus the entry's :data:`CPU_OVERRIDES` and ``--extra``, with its output
tee'd to ``<out>/<entry>.log``. The numbers come from each run's own ``results.json`` (its final
evaluation on the test split, trained backbone and random-init backbone). Beside them, computed here
without training: kNN on raw normalised pixels under the same protocol as the final evaluation, and
plain Euclidean 5-NN on all 60,000 training images (the classic Fashion-MNIST pixel baseline).

A failed run is a row marked failed with its last error line; the next method still runs; the exit
code is 1 when any method failed. ``--reuse`` skips a method whose run folder already holds
``results.json`` and a ``budget.json`` with the same budget, so an interrupted benchmark resumes.
Hand-written text under ``## Notes`` in an existing results page survives regeneration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from src.bench.quality_page import (
    COLOUR_DATA,
    EUCLID_K,
    GRAY_DATA,
    TOKENIZER_ENTRY,
    VIT,
    existing_notes,
    format_stdout_table,
    render_markdown,
)
from src.config.compose import compose, fitted, group_options
from src.utils.io import write_text_atomic

# What this benchmark's budget (10 epochs over 10,240 images) adds to each run, beyond what a plain CPU run already
# gets from conf/fit/ (queues, heads, CLIP's text tower, MAE's decoder: listed under each method in the page):
# - 1 warm-up epoch instead of the papers' 10 (which the base would cap at half of this 10-epoch run);
# - BEiT reads the visual tokenizer the vqvae entry trains first;
# - MoCo v3 on the ViT: the paper's ViT settings where they differ from the method yaml (AdamW 1.5e-4, wd 0.1,
#   tau 0.2, 3-layer projector, fixed random patch projection and sin-cos positions).
_WARMUP = ["method.warmup_epochs=1"]
BENCH_OVERRIDES: dict[str, list[str]] = {
    **{m: _WARMUP for m in ("simclr", "moco_v3", "byol", "nnclr", "barlow_twins", "vicreg", "dino", "swav")},
    **{f"{m}@{VIT}": _WARMUP for m in ("mae", "dino", "ibot", "dinov2")},
    f"beit@{VIT}": ["method.tokenizer={out}/" + TOKENIZER_ENTRY + "/checkpoints/last.ckpt", *_WARMUP],
    f"moco_v3@{VIT}": ["method.temperature=0.2", "method.proj_layers=3", "method.optimizer._target_=torch.optim.AdamW",
                       "method.optimizer.lr=1.5e-4", "method.optimizer.weight_decay=0.1", "backbone.pos_embed=sincos",
                       "backbone.freeze_patch_embed=true", *_WARMUP],
}
REQUIRES = {f"beit@{VIT}": TOKENIZER_ENTRY}  # entry -> the entry whose checkpoint it reads

ALIASES = {"moco"}  # conf/method/moco.yaml is moco_v2 under another name


# ---- what runs -----------------------------------------------------------------------------------
def split_entry(entry: str) -> tuple[str, str]:
    """(method, backbone) of ``method`` (the convnet) or ``method@backbone``."""
    method, _, backbone = entry.partition("@")
    return method, backbone or "convnet"


def folder_name(entry: str) -> str:
    return entry.replace("@", "_")


def reads_tokens(method: str) -> bool:
    from hydra.utils import get_class

    return getattr(get_class(compose([f"method={method}"]).method._target_), "needs_tokens", False)


def default_methods() -> list[str]:
    """Every method on the convnet (but the alias moco and the ViT-only methods), then the ViT entries."""
    convnet = [m for m in group_options("method") if m not in ALIASES and not reads_tokens(m)]
    return convnet + [f"{m}@{VIT}" for m in ("mae", "beit", "dino", "ibot", "dinov2", "moco_v3")]


def data_for(entry: str) -> str:
    """The dataset a method is measured on: Fashion-MNIST, or CIFAR-10 for methods that need colour."""
    from hydra.utils import get_class

    target = compose([f"method={split_entry(entry)[0]}"]).method._target_
    return COLOUR_DATA if getattr(get_class(target), "needs_colour", False) else GRAY_DATA


def colour_data_missing(extra: list[str]) -> str | None:
    """Why CIFAR-10 cannot be read offline with the ``data.*`` / ``paths.*`` overrides of ``extra``, or None."""
    from hydra.utils import instantiate

    keep = [o for o in extra if o.lstrip("+~").startswith(("data.", "paths."))]
    cfg = compose([f"data={COLOUR_DATA}", *keep, "data.download=false"])
    try:
        instantiate(cfg.data).setup("fit")
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError, our checks UserError
        return (f"{COLOUR_DATA} is not on this machine (not under data.root={cfg.data.root}; {type(e).__name__}) "
                "and cannot be downloaded offline, so nothing was run on colour data; pass --extra "
                "data.root=<folder holding it> where it is")
    return None


def run_command(entry: str, out: Path, epochs: int, train_samples: int, seed: int, extra: list[str],
                data: str = GRAY_DATA) -> list[str]:
    """``python -m src.train ...`` for one entry (``method`` or ``method@backbone``), as a user would type it."""
    method, backbone = split_entry(entry)
    cpu = [o.replace("{out}", str(out)) for o in BENCH_OVERRIDES.get(entry, [])]
    return [sys.executable, "-m", "src.train", f"method={method}", f"data={data}", f"backbone={backbone}",
            f"trainer.max_epochs={epochs}", f"data.max_train_samples={train_samples}", f"seed={seed}",
            "logger=csv", f"hydra.run.dir={out / folder_name(entry)}", *cpu, *extra]


def fit_lines(cmd: list[str]) -> list[str]:
    """What conf/fit/ changes in the run of ``cmd`` (the lines the run itself prints)."""
    cfg = compose([o for o in overrides_of(cmd) if not o.startswith("hydra.")], return_hydra_config=True)
    return fitted(cfg, cfg.hydra.runtime.choices)


def overrides_of(cmd: list[str]) -> list[str]:
    """The overrides of a :func:`run_command` without ``hydra.run.dir`` (what defines the run's budget)."""
    return [o for o in cmd[3:] if not o.startswith("hydra.run.dir=")]


def budget_record(epochs: int, train_samples: int, seed: int, overrides: list[str]) -> dict:
    return {"epochs": epochs, "train_samples": train_samples, "seed": seed, "overrides": overrides}


@dataclass
class MethodRun:
    method: str
    overrides: list[str]
    results: dict | None = None
    error: str | None = None
    skipped: str | None = None  # why the method was not run (e.g. no colour data offline)
    data: str = GRAY_DATA
    reused: bool = False
    process_wall_s: float | None = None
    optimizer: str = "?"
    views: str = "?"
    log: str = ""
    config: dict = field(default_factory=dict)  # batch size etc. as composed
    bench: list[str] = field(default_factory=list)  # what this benchmark adds (BENCH_OVERRIDES)
    fitted: list[str] = field(default_factory=list)  # what conf/fit/ changed (the run's own log lines)

    @property
    def backbone(self) -> str:
        return split_entry(self.method)[1]

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.results is not None


def last_error_line(text: str, returncode: int | None = None) -> str:
    """The most telling line of a failed run's output: the last ``error:`` line, else the last line that
    names an error or exception (a traceback's last line), else the last non-empty line."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln[:300]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|Traceback|Killed)\b", ln):
            return ln[:300]
    if lines:
        return lines[-1][:300]
    return f"exit code {returncode}" if returncode is not None else "no output"


def _tee(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with stdout+stderr copied to our stdout and to ``log_path``; return its exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                log.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            return proc.wait()


def _clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run of this benchmark in ``run_dir`` so stale results cannot be read back."""
    if not run_dir.exists():
        return
    ours = any((run_dir / p).exists() for p in (".hydra", "results.json", "budget.json", "csv", "checkpoints"))
    if run_dir.is_dir() and (ours or not any(run_dir.iterdir())):
        shutil.rmtree(run_dir)
    else:
        raise SystemExit(f"error: {run_dir} exists and is not a run folder of this benchmark; "
                         "choose another --out")


def run_method(cmd: list[str], method: str, out: Path, budget: dict, reuse: bool) -> MethodRun:
    run = MethodRun(method, overrides_of(cmd))
    run_dir, log_path = out / folder_name(method), out / f"{folder_name(method)}.log"
    results_path, budget_path = run_dir / "results.json", run_dir / "budget.json"
    run.log = str(log_path)
    if reuse and results_path.is_file() and budget_path.is_file():
        try:
            recorded = json.loads(budget_path.read_text())
            results = json.loads(results_path.read_text())
        except (OSError, ValueError):
            recorded = {}
        if {k: recorded.get(k) for k in budget} == budget:
            print(f"[quality] {method}: reusing {results_path} (same budget)", flush=True)
            run.results, run.reused, run.process_wall_s = results, True, recorded.get("process_wall_s")
            return _check_results(run)
        print(f"[quality] {method}: {run_dir} has another budget; running again", flush=True)
    _clear_run_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"\n[quality] {method}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    try:
        rc = _tee(cmd, log_path)
    except OSError as e:
        run.error = f"could not start: {e}"
        return run
    run.process_wall_s = round(time.time() - start, 1)
    if rc != 0:
        text = log_path.read_text(errors="replace")
        run.error = f"exit {rc}: {last_error_line(text.split(chr(10), 1)[-1], rc)}"
        return run
    if not results_path.is_file():
        run.error = f"exit 0 but no {results_path}"
        return run
    run.results = json.loads(results_path.read_text())
    write_text_atomic(budget_path, json.dumps({**budget, "process_wall_s": run.process_wall_s}, indent=2) + "\n")
    return _check_results(run)


def _check_results(run: MethodRun) -> MethodRun:
    missing = [k for k in ("knn_top1", "linear_top1", "random_knn_top1", "random_linear_top1")
               if not isinstance((run.results or {}).get(k), int | float)]
    if missing:
        run.error = f"results.json lacks {', '.join(missing)}"
    return run


def describe_method(run: MethodRun) -> None:
    """Optimiser (from the method's yaml) and views choice of ``run``, composed like the run composes them."""
    try:
        cfg = compose([o for o in run.overrides if not o.startswith("hydra.")], return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - a method being written may not compose yet
        run.optimizer = run.views = f"? ({type(e).__name__})"
        return
    opt = cfg.method.get("optimizer") or {}
    name = str(opt.get("_target_", "?")).rsplit(".", 1)[-1]
    parts = [f"lr {opt['lr']:g}"] if "lr" in opt else []
    parts += [f"wd {opt['weight_decay']:g}"] if "weight_decay" in opt else []
    run.optimizer = f"{name} ({', '.join(parts)})" if parts else name
    run.views = str(cfg.hydra.runtime.choices.get("views"))
    run.config = {"batch_size": int(cfg.data.batch_size), "warmup_epochs": cfg.method.get("warmup_epochs"),
                 "lr_scaling": cfg.method.get("lr_scaling")}


# ---- raw-pixel baselines -------------------------------------------------------------------------
def raw_pixel_baseline(extra: list[str]) -> dict:
    """kNN on raw normalised pixels under the final evaluation's protocol, and Euclidean 5-NN on all pixels.

    The data comes from the project's datamodule (``data=fashion_mnist`` composed with the ``data.*`` /
    ``paths.*`` / ``eval.*`` parts of ``extra``); the bank is chosen by :func:`extract_features`
    exactly as the final evaluation chooses it (evenly spaced, at most ``eval.final.max_train_items``).
    """
    import numpy as np
    from hydra.utils import instantiate
    from sklearn.neighbors import KNeighborsClassifier
    from torch import nn

    from src.nn.knn import knn_top1
    from src.protocols.features import extract_features

    keep = [o for o in extra if o.lstrip("+~").startswith(("data.", "paths.", "eval."))]
    cfg = compose(["data=fashion_mnist", *keep])
    final = cfg.eval.final
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    views = instantiate(cfg.views)  # only eval_view is used: resize/centre-crop to crop_size, normalise
    flat = nn.Flatten()
    start = time.time()
    tx, ty = extract_features(flat, views, dm.eval_train_dataloader(), "cpu", final.max_train_items)
    vx, vy = extract_features(flat, views, dm.eval_val_dataloader(), "cpu", final.max_val_items)
    cos = knn_top1(tx, ty, vx, vy, dm.num_classes, final.k, final.temperature)
    cos_s = time.time() - start

    start = time.time()
    train, test = dm.eval_train.split, dm.eval_val.split
    xtr = (train.images.reshape(len(train), -1).float() / 255.0).numpy()
    xte = (test.images.reshape(len(test), -1).float() / 255.0).numpy()
    clf = KNeighborsClassifier(n_neighbors=EUCLID_K).fit(xtr, train.labels.numpy())
    euclid = float(np.mean(clf.predict(xte) == test.labels.numpy())) * 100.0
    return {
        "knn_top1": round(cos, 2), "k": int(final.k), "temperature": float(final.temperature),
        "bank": int(tx.shape[0]), "queries": int(vx.shape[0]), "mean": list(cfg.data.mean),
        "std": list(cfg.data.std), "knn_s": round(cos_s, 1),
        "euclid_top1": round(euclid, 2), "euclid_k": EUCLID_K, "euclid_train": len(train),
        "euclid_queries": len(test), "euclid_s": round(time.time() - start, 1),
    }


def missing_requirement(entry: str, runs: list[MethodRun], out: Path) -> str | None:
    """Why ``entry`` cannot run: the entry it reads (BEiT: the tokenizer) failed here or left no checkpoint."""
    need = REQUIRES.get(entry)
    if need is None:
        return None
    earlier = next((r for r in runs if r.method == need), None)
    if earlier is not None and not earlier.ok:
        return f"needs the checkpoint of the {need} run, which did not finish"
    if not (out / folder_name(need) / "checkpoints" / "last.ckpt").is_file():
        return f"needs the checkpoint of the {need} run ({out / folder_name(need)}); run that entry first"
    return None


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} (with uncommitted changes)" if dirty else sha


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()} {platform.machine()}"


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m src.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", help="comma-separated entries, method or method@backbone (default: every method on "
                   "the convnet but the alias moco and the ViT-only ones, then mae, beit, dino, ibot, dinov2 and moco_v3 on vit_cpu)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-samples", type=int, default=10240, help="pre-training subset (data.max_train_samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/quality"), help="run folders <out>/<method> and logs")
    p.add_argument("--results", type=Path, default=Path("docs/results.md"), help="the markdown page to write")
    p.add_argument("--reuse", action="store_true", help="skip methods whose <out>/<method> has results of the same budget")
    p.add_argument("--extra", action="extend", nargs="+", default=[], metavar="OVERRIDE",
                   help="Hydra overrides passed to every run, e.g. --extra eval.final.linear_epochs=50")
    p.add_argument("--no-baseline", action="store_true", help="skip the raw-pixel baselines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    available = default_methods()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else available
    unknown = [m for m in methods if split_entry(m)[0] not in group_options("method")
               or split_entry(m)[1] not in group_options("backbone")]
    if unknown or not methods:
        print(f"error: unknown method or backbone {', '.join(unknown) or '(none given)'}; available: "
              f"{', '.join(available)} (method@backbone for another backbone)",
              file=sys.stderr)
        return 2
    meta = {"epochs": args.epochs, "train_samples": args.train_samples, "seed": args.seed,
            "command": "python -m src.bench.quality" + (" " + shlex.join(argv) if argv else ""),
            "commit": _git_commit(), "machine": _machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    print(f"[quality] methods: {', '.join(methods)}; {args.epochs} epochs x {args.train_samples} images, "
          f"seed {args.seed}; runs under {args.out}", flush=True)

    baseline = None
    if not args.no_baseline:
        print("[quality] raw-pixel baselines ...", flush=True)
        baseline = raw_pixel_baseline(args.extra)
        print(f"[quality] raw-pixel kNN {baseline['knn_top1']:.2f} ({baseline['knn_s']} s), "
              f"Euclidean {EUCLID_K}-NN {baseline['euclid_top1']:.2f} ({baseline['euclid_s']} s)", flush=True)

    runs = []
    colour_missing = None
    for m in methods:
        data = data_for(m)
        cmd = run_command(m, args.out, args.epochs, args.train_samples, args.seed, args.extra, data)
        if data != GRAY_DATA and (colour_missing := colour_missing or colour_data_missing(args.extra)):
            runs.append(MethodRun(m, overrides_of(cmd), skipped=colour_missing, data=data))
            print(f"[quality] {m}: not run: {colour_missing}", flush=True)
            continue
        if why := missing_requirement(m, runs, args.out):
            runs.append(MethodRun(m, overrides_of(cmd), skipped=why, data=data))
            print(f"[quality] {m}: not run: {why}", flush=True)
            continue
        budget = budget_record(args.epochs, args.train_samples, args.seed, overrides_of(cmd))
        run = run_method(cmd, m, args.out, budget, args.reuse)
        run.data, run.bench, run.fitted = data, BENCH_OVERRIDES.get(m, []), fit_lines(cmd)
        describe_method(run)
        runs.append(run)
        print(f"[quality] {m}: {'ok' if run.ok else 'FAILED: ' + str(run.error)}", flush=True)

    notes = existing_notes(args.results.read_text()) if args.results.is_file() else ""
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.results, render_markdown(runs, baseline, meta, notes))
    print("\n" + format_stdout_table(runs, baseline) + f"\n\nwritten: {args.results}", flush=True)
    failed = [r.method for r in runs if not r.ok and not r.skipped]
    if failed:
        print(f"failed: {', '.join(failed)} (logs: {args.out}/<method>.log)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
