"""`python -m src.bench.defaults`: every method's plain run, as a newcomer types it, and a page of what it gives.

Each method runs as ``python -m src.train method=<m> hydra.run.dir=<out>/<m>`` and nothing else: the default
data (Fashion-MNIST, 7 epochs over a fixed 10,240-image subset), backbone (the convnet; the ViT-only methods pick
``vit_cpu``), evaluation and hardware (the CPU, with the sizes of ``conf/fit/``). BEiT also gets the checkpoint of
the ``vqvae`` run (``method.tokenizer=<out>/vqvae/checkpoints/last.ckpt``), the one thing it cannot run without.
The page (default docs/results_defaults.md) has one row per method: what conf/fit/ changed, the run's wall time
(``wall_time_s``: training set-up to the end of the final evaluation) and training images/s, kNN and linear top-1
on the test split beside the random-init backbone, and kNN on held-out training images. A method that cannot run
here (colour-only pretext tasks on grayscale data) shows its one-line refusal. ``--reuse`` keeps a method's run
whose folder already holds ``results.json``; ``--no-run`` writes the page from the runs already there, listing the
others as not measured (so runs made one at a time, in any order, end in one page).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from src.bench.quality import ALIASES, fit_lines, last_error_line
from src.bench.quality_page import _md, _num
from src.config.compose import group_options
from src.utils.io import write_text_atomic

TEN_MINUTES = 600


def command(method: str, out: Path) -> list[str]:
    extra = [f"method.tokenizer={out / 'vqvae' / 'checkpoints' / 'last.ckpt'}"] if method == "beit" else []
    return [sys.executable, "-m", "src.train", f"method={method}", *extra, f"hydra.run.dir={out / method}"]


def run(method: str, out: Path, reuse: bool, make: bool = True) -> dict:
    """The method's results (plus ``process_wall_s`` when run here) or ``{"error": line}``; with ``make`` False, no run
    starts: the results already there, the refusal an earlier call logged, else ``{}`` (not measured)."""
    results, log = out / method / "results.json", out / f"{method}.log"
    if not make and not results.is_file():
        text = log.read_text() if log.is_file() else ""  # a run under way has a log but no error: line
        return {"error": last_error_line(text)} if any(ln.startswith("error:") for ln in text.splitlines()) else {}
    if make and not (reuse and results.is_file()):
        start = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(command(method, out), stdout=f, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not results.is_file():
            return {"error": last_error_line(log.read_text(), proc.returncode)}
        record = {**json.loads(results.read_text()), "process_wall_s": round(time.time() - start, 1)}
        write_text_atomic(results.with_name("process.json"), json.dumps({"process_wall_s": record["process_wall_s"]}))
        return record
    extra = results.with_name("process.json")
    return {**json.loads(results.read_text()), **(json.loads(extra.read_text()) if extra.is_file() else {})}


def _changes(lines: list[str], label: str) -> list[str]:
    """The changes (``key value instead of own``, comma-separated) of the fit lines that start with ``label``."""
    return [ln.split(": ", 1)[1].split("; ")[0] for ln in lines if ln.startswith(label)]


def render(rows: dict[str, dict], fits: dict[str, list[str]], meta: dict) -> str:
    lines = [
        "# Every method's default CPU run",
        "",
        "Each method as a newcomer runs it, `python -m src.train method=<m>` and nothing else, on the default 2-core "
        "CPU: Fashion-MNIST, 7 epochs (fewer where the column CPU-sized says so) over a fixed 10,240-image subset "
        "(seed 0), the convnet (with the 4x4 pooling grid fitted to this dataset where the backbone column says "
        "pool_grid 4) or, for the ViT-only methods, `vit_cpu`, the default evaluation (online probe, kNN monitor, health, "
        "final kNN k=200 and L-BFGS linear probe on 10,000 train images, measured on the 10,000 test images, beside a "
        "randomly initialised backbone of the same architecture). Methods whose paper sizes do not fit the machine get "
        "`conf/fit/method/<m>_cpu.yaml` (column \"CPU-sized\"). wall: the run's `wall_time_s` (training set-up to the "
        "end of the final evaluation; the process start adds 10-20 s).",
        "",
        "Command:",
        "",
        "```bash",
        meta["command"] + "   # [long]",
        "```",
        "",
        f"Date: {meta['date']} · commit: `{meta['commit']}` · {meta['machine']}",
        "",
        "| method | backbone | CPU-sized | wall (s) | train img/s | kNN | random kNN | linear | random linear "
        "| val kNN | beats random (kNN, linear) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for method, r in rows.items():
        fit = "; ".join(_changes(fits.get(method, []), "CPU-sized"))
        data_fit = ", ".join(change.removeprefix("backbone.").split(" instead of ")[0]
                             for part in _changes(fits.get(method, []), "fitted to data") for change in part.split(", "))
        if not r:
            lines.append(f"| {method} | — | {_md(fit) or '—'} | — | — | not measured yet | — | — | — | — | — |")
            continue
        if "error" in r:
            lines.append(f"| {method} | — | {_md(fit) or '—'} | — | — | {_md('not run: ' + r['error'])} | — | — | — | — | — |")
            continue
        knn, lin = r["knn_top1"] - r["random_knn_top1"], r["linear_top1"] - r["random_linear_top1"]
        verdict = f"{'yes' if knn > 0 else 'no'} ({knn:+.2f}), {'yes' if lin > 0 else 'no'} ({lin:+.2f})"
        over = " (over 10 min)" if r.get("wall_time_s", 0) > TEN_MINUTES else ""
        backbone = f"{r.get('backbone')} ({data_fit})" if data_fit else r.get("backbone")
        lines.append(f"| {method} | {backbone} | {_md(fit) or '—'} | {_num(r.get('wall_time_s'), '.0f')}{over} "
                     f"| {_num(r.get('train_images_per_s'), '.0f')} | {_num(r['knn_top1'])} | {_num(r['random_knn_top1'])} "
                     f"| {_num(r['linear_top1'])} | {_num(r['random_linear_top1'])} | {_num(r.get('val_knn_top1'))} "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from src.bench.quality import _git_commit, _machine

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m src.bench.defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", help="comma-separated (default: every method but the alias moco)")
    p.add_argument("--out", type=Path, default=Path("outputs/defaults"))
    p.add_argument("--results", type=Path, default=Path("docs/results_defaults.md"))
    p.add_argument("--reuse", action="store_true", help="keep runs whose folder already holds results.json")
    p.add_argument("--no-run", action="store_true", help="start no run: the page from the runs already in --out")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else [m for m in group_options("method") if m not in ALIASES]
    if "beit" in methods and "vqvae" in methods:  # BEiT reads the tokenizer the vqvae run trains
        methods.remove("beit")
        methods.insert(methods.index("vqvae") + 1, "beit")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, fits = {}, {}
    for m in methods:
        print(f"[defaults] {m} ...", flush=True)
        rows[m] = run(m, args.out, args.reuse, make=not args.no_run)
        fits[m] = fit_lines(command(m, args.out))
        print(f"[defaults] {m}: {rows[m].get('error') or rows[m].get('wall_time_s')}", flush=True)
    meta = {"command": "python -m src.bench.defaults" + (" " + shlex.join(argv) if argv else ""),
            "commit": _git_commit(), "machine": _machine(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    write_text_atomic(args.results, render(rows, fits, meta))
    print(f"written: {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
