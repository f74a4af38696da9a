"""`python -m src.report <multirun folder | run folders...> [--out DIR] [--all]`: every run's results in one table.

Each run folder (a folder with ``results.json``; a multirun folder is searched for them) contributes its
``results.json`` and the protocol results beside its checkpoint (``checkpoints/<stem>.<tag>.json``, written by the
final evaluation or by ``python -m src.eval CKPT protocol=...``). The table has one row per run (named by its job
folder and the overrides that differ between runs) and one column per evaluation figure that has a random-init
baseline, shown as ``trained / random``; few-shot means carry their confidence interval. ``--all`` adds the top-5
and other secondary figures. Written to ``DIR/report.md`` and ``DIR/report.png`` (a bar plot with the random-init
baselines as ticks), printed, and, when the runs logged to W&B, logged as a ``wandb.Table`` in a summary run of their
group. ``DIR`` defaults to the folder given (or the folders' common parent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from src.utils.errors import fail
from src.utils.io import write_text_atomic
from src.utils.sweeps import short_override

SECONDARY = ("_top5", "_train_images", "_ci", "_picture")  # left out of the table unless --all (CIs go in cells)


def find_runs(paths: list[Path]) -> list[Path]:
    """Run folders (holding results.json) at or under ``paths``, in order, each once."""
    runs: list[Path] = []
    for path in paths:
        if not path.exists():
            fail([f"{path}: no such folder; pass run folders or a multirun folder (outputs/multirun/<date>)"])
        found = [path] if (path / "results.json").is_file() else sorted(p.parent for p in path.rglob("results.json"))
        runs += [r for r in found if r not in runs]
    return runs


def read_run(run: Path) -> dict[str, Any]:
    """results.json merged with the protocol files beside its checkpoints (their figures, not their settings)."""
    results = json.loads((run / "results.json").read_text())
    for path in sorted((run / "checkpoints").glob("*.json")) if (run / "checkpoints").is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "protocol" in record:
            results.update({k: v for k, v in record.items() if k not in {"settings", "wall_time_s", "protocol", "tag"}})
    overrides = run / ".hydra" / "overrides.yaml"
    results["_overrides"] = [str(o) for o in OmegaConf.load(overrides)] if overrides.is_file() else []
    return results


def metric_columns(rows: list[dict], everything: bool) -> list[str]:
    """Figures with a random-init baseline in some run, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("random_") or f"random_{key}" not in row or key in columns:
                continue
            if isinstance(row[key], bool) or not isinstance(row[key], int | float):
                continue
            if everything or not key.endswith(SECONDARY):
                columns.append(key)
    return columns


def run_names(runs: list[Path], rows: list[dict]) -> list[str]:
    """The job folder's name and the overrides this run does not share with every other run."""
    shared = set.intersection(*(set(r["_overrides"]) for r in rows)) if len(rows) > 1 else set()
    names = []
    for run, row in zip(runs, rows, strict=True):
        own = " ".join(short_override(o) for o in row["_overrides"] if o not in shared and not o.startswith("hydra."))
        names.append(f"{run.name} ({own})" if own else run.name)
    return names


def cell(row: dict, key: str) -> str:
    def show(v):
        return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    ci = key.removesuffix("_top1") + "_ci" if key.startswith("fewshot_") else None
    trained = show(row.get(key)) + (f" ± {row[ci]:.2f}" if ci and isinstance(row.get(ci), int | float) else "")
    return f"{trained} / {show(row.get('random_' + key))}"


def markdown(names: list[str], rows: list[dict], columns: list[str]) -> str:
    head = ["run", *columns]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, row in zip(names, rows, strict=True):
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *(cell(row, c) for c in columns)]) + " |")
    return "\n".join(lines)


def bar_plot(names: list[str], rows: list[dict], columns: list[str], path: Path) -> Path:
    """Grouped bars (one group per figure, one bar per run), each run's random-init baseline as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(columns) * max(1, len(rows) / 3)), 4.5), dpi=100)
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        ax.bar(xs, [row.get(c) or 0 for c in columns], width, label=name[:60])
        base = [(x, row.get("random_" + c)) for x, c in zip(xs, columns, strict=True)]
        ax.hlines([v for _, v in base if v is not None], [x - width / 2 for x, v in base if v is not None],
                  [x + width / 2 for x, v in base if v is not None], colors="black", linewidth=2)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% (black ticks: random-init baseline)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def wandb_config(runs: list[Path]):
    """The W&B logger settings of the first run that logged to W&B (its saved config), or None."""
    for run in runs:
        config = run / ".hydra" / "config.yaml"
        if config.is_file() and (found := (OmegaConf.load(config).get("logger") or {}).get("wandb")) is not None:
            return found
    return None


def report(paths: list[Path], out: Path | None = None, everything: bool = False) -> tuple[str, Path, Path]:
    runs = find_runs(paths)
    if not runs:
        fail([f"no results.json under {', '.join(map(str, paths))}; pass finished run folders or a multirun folder"])
    rows = [read_run(r) for r in runs]
    columns = metric_columns(rows, everything)
    if not columns:
        fail(["the runs have no evaluation figures with a random-init baseline (eval=none?); nothing to compare"])
    names = run_names(runs, rows)
    text = markdown(names, rows, columns)
    out = out or (paths[0] if len(paths) == 1 and paths[0].is_dir() else Path(os.path.commonpath(runs)))
    out.mkdir(parents=True, exist_ok=True)
    md, png = out / "report.md", out / "report.png"
    bar_plot(names, rows, columns, png)
    write_text_atomic(md, f"# Report of {len(runs)} runs\n\nEach cell: trained / random-init baseline (same architecture, "
                  f"same protocol); few-shot: mean ± confidence half-width over episodes.\n\n{text}\n\n![bars]({png.name})\n")
    from src.utils.loggers import log_wandb_table

    log_wandb_table(wandb_config(runs), out, "report", "report", "report", ["run", *columns],
                    [[n, *(cell(r, c) for c in columns)] for n, r in zip(names, rows, strict=True)],
                    images={"report_plot": png})
    return text, md, png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders or a multirun folder")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and report.png go")
    parser.add_argument("--all", action="store_true", help="also top-5 and other secondary figures")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    text, md, png = report(args.paths, args.out, args.all)
    print(f"{text}\n\nreport: {md} and {png}", flush=True)


if __name__ == "__main__":
    main()
