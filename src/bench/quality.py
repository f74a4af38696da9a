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

from src.config.compose import compose, group_options
from src.utils.io import write_text_atomic

# Per-method Hydra overrides that fit the paper configs to a 400-step CPU budget on 10,240 images; every
# override used is printed under the method in the results page. Three kinds only:
# - queues no larger than a fraction of the subset (65,536 / 98,304 entries would be mostly the random
#   initial vectors, or the query's own image, for the whole run);
# - heads sized for a 128-d convnet feature instead of a 2048-d ResNet-50 one where the head, not the
#   backbone, would dominate the CPU time (Barlow Twins / VICReg 8192 x 8192, DINO's 65,536-way head);
# - 1 warm-up epoch instead of the papers' 10 (which the base would cap at half of this 10-epoch run);
# - SwAV's prototypes frozen for one epoch as the paper says (its 313 steps are one ImageNet epoch at
#   batch 4096, but 78% of this 400-step run).
# ViT entries: the paper's ViT settings where they differ from the method yaml (MoCo v3: AdamW 1.5e-4, wd 0.1,
# tau 0.2, 3-layer projector, fixed random patch projection and sin-cos positions), MAE's decoder sized for a
# 128-d encoder (512 x 8 blocks would cost 30x the encoder per image), the same head sizes as the convnet rows.
_WARMUP = ["method.warmup_epochs=1"]
_DINO = ["method.out_dim=4096", "method.hidden_dim=1024", *_WARMUP]
VIT = "vit_cpu"
TOKENIZER_ENTRY = "vqvae"
CPU_OVERRIDES: dict[str, list[str]] = {
    "simclr": _WARMUP,
    "moco_v1": ["method.queue_size=4096"],
    "moco_v2": ["method.queue_size=4096"],
    "moco_v3": _WARMUP,
    "byol": _WARMUP,
    "nnclr": ["method.queue_size=4096", *_WARMUP],
    "barlow_twins": ["method.proj_hidden_dim=2048", "method.proj_dim=2048", *_WARMUP],
    "vicreg": ["method.proj_hidden_dim=2048", "method.proj_dim=2048", *_WARMUP],
    "dino": _DINO,
    "swav": ["method.freeze_prototypes_steps=40", *_WARMUP],
    f"mae@{VIT}": ["method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4", *_WARMUP],
    f"beit@{VIT}": ["method.tokenizer={out}/" + TOKENIZER_ENTRY + "/checkpoints/last.ckpt", *_WARMUP],
    f"dino@{VIT}": _DINO,
    # CLIP: captions from the class names through the prompt templates (Fashion-MNIST has no captions); a text tower
    # of 3 blocks, 128 wide, over 20 tokens (the longest class prompt has 13) instead of 12 x 512 over 77
    "clip": ["data.captions=class_prompts", "method.context_length=20", "method.text_width=128", "method.text_heads=4",
             "method.text_layers=3", "method.embed_dim=128"],
    f"moco_v3@{VIT}": ["method.temperature=0.2", "method.proj_layers=3", "method.optimizer._target_=torch.optim.AdamW",
                       "method.optimizer.lr=1.5e-4", "method.optimizer.weight_decay=0.1", "backbone.pos_embed=sincos",
                       "backbone.freeze_patch_embed=true", *_WARMUP],
}
REQUIRES = {f"beit@{VIT}": TOKENIZER_ENTRY}  # entry -> the entry whose checkpoint it reads

GRAY_DATA, COLOUR_DATA = "fashion_mnist", "cifar10"

ALIASES = {"moco"}  # conf/method/moco.yaml is moco_v2 under another name
NOTES_HEADING = "## Notes"
NOTES_MARKER = "<!-- notes: written by hand after the run -->"
EUCLID_K = 5


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
    return convnet + [f"{m}@{VIT}" for m in ("mae", "beit", "dino", "moco_v3")]


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
    cpu = [o.replace("{out}", str(out)) for o in CPU_OVERRIDES.get(entry, [])]
    return [sys.executable, "-m", "src.train", f"method={method}", f"data={data}", f"backbone={backbone}",
            f"trainer.max_epochs={epochs}", f"data.max_train_samples={train_samples}", f"seed={seed}",
            "logger=csv", f"hydra.run.dir={out / folder_name(entry)}", *cpu, *extra]


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


# ---- the results page ----------------------------------------------------------------------------
def existing_notes(text: str) -> str:
    """Hand-written text under ``## Notes`` of an existing page (without the marker comment), or ''."""
    m = re.search(rf"^{re.escape(NOTES_HEADING)}[ \t]*$", text, flags=re.MULTILINE)
    if m is None:
        return ""
    body = text[m.end():].replace(NOTES_MARKER, "")
    return body.strip("\n") if body.strip() else ""


def _num(v, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "—"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdicts(run: MethodRun, raw_knn: float | None) -> tuple[str, str]:
    """(beats random in both kNN and linear, beats raw-pixel kNN) as table cells."""
    if not run.ok:
        return "—", "—"
    r = run.results
    knn_gain, lin_gain = r["knn_top1"] - r["random_knn_top1"], r["linear_top1"] - r["random_linear_top1"]
    rand = "yes" if knn_gain > 0 and lin_gain > 0 else f"no (kNN {knn_gain:+.2f}, linear {lin_gain:+.2f})"
    if raw_knn is None:
        return rand, "—"
    gain = r["knn_top1"] - raw_knn
    return rand, f"{'yes' if gain > 0 else 'no'} ({gain:+.2f})"


def render_markdown(runs: list[MethodRun], baseline: dict | None, meta: dict, notes: str = "") -> str:
    epochs, n, seed = meta["epochs"], meta["train_samples"], meta["seed"]
    batch = next((r.config["batch_size"] for r in runs if r.config.get("batch_size")), meta.get("batch_size", 256))
    ok = [r for r in runs if r.ok]
    bank = ok[0].results.get("eval_train_items") if ok else (baseline or {}).get("bank")
    queries = ok[0].results.get("eval_val_items") if ok else (baseline or {}).get("queries")
    split = ok[0].results.get("eval_val_split", "test") if ok else "test"
    per_method = "; ".join(f"`{r.method}`: {r.optimizer}, views `{r.views}`" for r in runs if not r.skipped)
    raw_knn = baseline["knn_top1"] if baseline else None
    gray = [r for r in runs if r.data == GRAY_DATA and r.backbone == "convnet"]
    colour = [r for r in runs if r.data != GRAY_DATA]
    vit = [r for r in runs if r.data == GRAY_DATA and r.backbone != "convnet"]
    colour_note = f" (methods that need colour images: on {COLOUR_DATA}, see the last table)" if colour else ""
    lines = [
        "# Representation quality on Fashion-MNIST (CPU budget)",
        "",
        f"Every method was pre-trained from scratch, one after another on the same machine, "
        f"on real Fashion-MNIST{colour_note} with the same backbone (`convnet`, 32/64/128 channels, 128-d features; "
        f"the ViT rows: `{VIT}`, see their table) and the "
        f"same budget: {epochs} epoch{'s' if epochs != 1 else ''} over a fixed random subset of {n:,} training images (seed {seed}), i.e. "
        f"{epochs * n:,} images seen, batch size {batch} ({n // batch} steps per epoch), fp32 on the CPU. "
        f"Each method keeps its own optimiser (from its yaml; the learning rate is scaled by batch/256 where "
        f"the yaml says so) and its own augmentation recipe (the run's `views` choice): {per_method}. "
        f"Evaluation is each run's own final evaluation of the frozen backbone: weighted kNN (cosine, k=200, "
        f"votes exp(sim/0.07)) and a linear probe (logistic regression on standardised features), both "
        f"fitted on {_num(bank, ',')} evenly spaced train images and measured on the whole {split} split "
        f"({_num(queries, ',')} images); \"random\" is the same evaluation of a randomly initialised "
        f"backbone of the same architecture. Top-1 in %, one seed.",
        "",
        "Command:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Date: {meta['date']} · commit: `{meta['commit']}` · machine: {meta['machine']}",
        "",
        *_table(gray, raw_knn),
        "",
        "train img/s: training images (not views) per second, training steps only; wall: the run's "
        "`wall_time_s`, from training set-up to the end of the final evaluation; pretext acc: the training "
        "accuracy of a classification pretext task (rotation, patch location, jigsaw; BEiT: the masked-token prediction), mean over the last epoch.",
    ]
    if colour:
        lines += ["", f"## Methods that need colour images ({COLOUR_DATA})", "", *_table(colour, None)]
    if vit:
        lines += ["", f"## Vision Transformers (`{VIT}`)", "",
                  f"The same budget and evaluation on the CPU-sized ViT (`backbone={VIT}`: 128 wide, 4 blocks, 4 heads, "
                  "4 px patches, i.e. 7x7 tokens of a 28 px image, 0.8M parameters); \"random\" is a randomly "
                  f"initialised `{VIT}`. `beit@{VIT}` reads the visual tokens of the `{TOKENIZER_ENTRY}` run above "
                  "(a VQ-VAE on the convnet, one token per 4x4 px patch). MAE is known to be weak under frozen-feature "
                  "probes (kNN, linear) and strong under fine-tuning, which this table does not measure.",
                  "", *_table(vit, raw_knn)]
    image_text = [r for r in runs if r.ok and "zeroshot_top1" in r.results]
    if image_text:
        lines += ["", "## Image–text (CLIP on class-prompt captions)", "",
                  "Captions are the class names in the prompt templates of `src/data/captions.py` (`data.captions="
                  "class_prompts`): this shows the machinery (tokenizer, loss, zero-shot, retrieval) working on real "
                  "images, not open-vocabulary learning. Zero-shot: each test image against the 10 class embeddings "
                  "(mean over the templates), on the whole test split. Retrieval: the first 1,000 test images and "
                  "their captions (every template of their class; one caption describes every image of its class, "
                  "so there are 80 distinct captions); \"random\" is a freshly initialised image and text tower.",
                  "", *_image_text_table(image_text)]
    lines += ["",
              "Overrides of each run (after `python -m src.train`, besides `hydra.run.dir=<out>/<entry>`):", ""]
    for run in runs:
        cpu = CPU_OVERRIDES.get(run.method, [])
        cpu_txt = " ".join(f"`{o}`" for o in cpu) if cpu else "none"
        reused = " (result reused from an earlier run of the same budget)" if run.reused else ""
        lines.append(f"- **{run.method}**: `{' '.join(run.overrides)}`; CPU-budget overrides: {cpu_txt}{reused}")
    lines += ["", "## Raw-pixel baselines (Fashion-MNIST)", ""]
    if baseline:
        lines += [
            f"- kNN on raw pixels, same protocol as the runs (pixels normalised with mean {baseline['mean']} / "
            f"std {baseline['std']}, flattened; cosine, k={baseline['k']}, weights exp(sim/{baseline['temperature']:g}), "
            f"bank = {baseline['bank']:,} evenly spaced train images, queries = {baseline['queries']:,} test images): "
            f"**{baseline['knn_top1']:.2f}**",
            f"- Euclidean {baseline['euclid_k']}-NN, majority vote (`sklearn KNeighborsClassifier(n_neighbors="
            f"{baseline['euclid_k']})`), all {baseline['euclid_train']:,} train images, pixels / 255, "
            f"{baseline['euclid_queries']:,} test images: **{baseline['euclid_top1']:.2f}** "
            "(published figure for this classifier on Fashion-MNIST: about 85-86)",
        ]
    else:
        lines.append("- not computed (`--no-baseline`)")
    lines += ["", NOTES_HEADING, "", NOTES_MARKER, ""]
    if notes:
        lines += [notes, ""]
    return "\n".join(lines)


def _table(runs: list[MethodRun], raw_knn: float | None) -> list[str]:
    lines = ["| method | kNN top-1 | linear top-1 | random kNN | random linear | beats random (kNN and linear) "
             "| beats raw-pixel kNN | train img/s | wall (s) | pretext acc |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    for run in runs:
        if not run.ok:
            why = f"not run: {run.skipped}" if run.skipped else f"**failed**: {run.error or '?'}"
            lines.append(f"| {run.method} | {_md(why)} | — | — | — | — | — | — | — | — |")
            continue
        r = run.results
        rand, raw = verdicts(run, raw_knn)
        lines.append(f"| {run.method} | {_num(r['knn_top1'])} | {_num(r['linear_top1'])} "
                     f"| {_num(r['random_knn_top1'])} | {_num(r['random_linear_top1'])} | {rand} | {raw} "
                     f"| {_num(r.get('train_images_per_s'), '.0f')} | {_num(r.get('wall_time_s'), '.0f')} "
                     f"| {_num(r.get('pretext_acc'))} |")
    return lines


def _image_text_table(runs: list[MethodRun]) -> list[str]:
    keys = ["zeroshot_top1", "zeroshot_top5", "random_zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5",
            "random_i2t_r1", "random_t2i_r1"]
    lines = ["| method | zero-shot top-1 | zero-shot top-5 | random zero-shot top-1 | image->text R@1 | image->text R@5 "
             "| text->image R@1 | text->image R@5 | random image->text R@1 | random text->image R@1 |",
             "| --- |" + " ---: |" * len(keys)]
    for run in runs:
        lines.append(f"| {run.method} | " + " | ".join(_num(run.results.get(k)) for k in keys) + " |")
    return lines


def format_stdout_table(runs: list[MethodRun], baseline: dict | None) -> str:
    head = f"{'method':<18} {'kNN':>6} {'linear':>6} {'rndKNN':>6} {'rndLin':>6} {'img/s':>6} {'wall s':>6}  status"
    lines = [head, "-" * len(head)]
    for run in runs:
        r = run.results or {}
        status = ("ok (reused)" if run.ok and run.reused else "ok" if run.ok
                  else f"not run: {run.skipped}" if run.skipped else f"FAILED: {run.error}")
        lines.append(f"{run.method:<18} {_num(r.get('knn_top1')):>6} {_num(r.get('linear_top1')):>6} "
                     f"{_num(r.get('random_knn_top1')):>6} {_num(r.get('random_linear_top1')):>6} "
                     f"{_num(r.get('train_images_per_s'), '.0f'):>6} {_num(r.get('wall_time_s'), '.0f'):>6}  {status}")
    if baseline:
        lines += ["", f"raw-pixel kNN (cosine, k={baseline['k']}, bank {baseline['bank']:,}, same protocol): "
                  f"{baseline['knn_top1']:.2f}",
                  f"raw-pixel Euclidean {baseline['euclid_k']}-NN (all {baseline['euclid_train']:,} train): "
                  f"{baseline['euclid_top1']:.2f}"]
    return "\n".join(lines)


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
                   "the convnet but the alias moco and the ViT-only ones, then mae, beit, dino and moco_v3 on vit_cpu)")
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
        run.data = data
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
