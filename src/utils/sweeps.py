"""The end of a sweep (``-m`` grids, Optuna searches, SLURM arrays): one table of every trial.

:class:`TrialsReport` is a Hydra callback (``hydra.callbacks`` in conf/train.yaml). When a multirun ends, in the
process that launched it, it reads each job folder under ``hydra.sweep.dir`` (its ``.hydra/overrides.yaml`` and
``results.json``), prints a table of the trials (overrides, objective, kNN, linear, status) best first, writes
``trials.md`` and ``trials.csv`` into the sweep folder and, when the runs log to W&B, logs the table as a
``wandb.Table`` in a summary run of the sweep's group. A failed or unfinished job is a row with its status.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.utils.io import write_text_atomic

COLUMNS = ("val_knn_top1", "knn_top1", "linear_top1", "zeroshot_top1", "wall_time_s")


def collect_trials(sweep_dir: Path, objective: str) -> list[dict[str, Any]]:
    """One dict per job folder of ``sweep_dir``: ``job``, ``overrides``, ``status``, ``objective`` and the
    :data:`COLUMNS` found in its results.json; finished trials first, best objective first."""
    trials = []
    for hydra_dir in sorted(sweep_dir.glob("*/.hydra")):
        job = hydra_dir.parent
        overrides = OmegaConf.load(hydra_dir / "overrides.yaml") if (hydra_dir / "overrides.yaml").is_file() else []
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(str(o) for o in overrides)}
        try:
            results = json.loads((job / "results.json").read_text())
            row["status"] = "done"
        except (OSError, ValueError):
            results = {}
            row["status"] = "failed or unfinished"
        value = results.get(objective)
        row["objective"] = float(value) if isinstance(value, int | float) else None
        row.update({k: results.get(k) for k in COLUMNS})
        trials.append(row)
    trials.sort(key=lambda r: (r["objective"] is None, -(r["objective"] or 0.0), r["job"]))
    return trials


def shared_overrides(trials: list[dict]) -> list[str]:
    """The overrides every trial has (shown once, above the table)."""
    sets = [r["overrides"].split(" ") for r in trials]
    return [o for o in sets[0] if all(o in s for s in sets[1:])] if sets else []


def short_override(override: str) -> str:
    """``key=0.46570785069955783`` -> ``key=0.4657``: sampled floats to 4 significant digits."""
    key, _, value = override.partition("=")
    try:
        return f"{key}={float(value):.4g}" if "." in value else override
    except ValueError:
        return override


def trials_markdown(trials: list[dict], objective: str) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else ("—" if v is None else str(v).replace("|", "\\|"))

    shared = set(shared_overrides(trials))
    columns = [c for c in COLUMNS if c != objective and any(r[c] is not None for r in trials)]  # e.g. no zero-shot
    head = ["job", "overrides", objective, *columns, "status"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in trials:
        own = " ".join(short_override(o) for o in r["overrides"].split(" ") if o not in shared) or "(none)"
        values = [r["job"], own, r["objective"], *[r[c] for c in columns], r["status"]]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def write_trials(trials: list[dict], sweep_dir: Path, objective: str) -> tuple[Path, Path]:
    md, table = sweep_dir / "trials.md", sweep_dir / "trials.csv"
    write_text_atomic(md, f"# Trials of {sweep_dir}\n\nObjective: `{objective}` (best first). Every trial: "
                  f"`{' '.join(shared_overrides(trials))}`\n\n{trials_markdown(trials, objective)}\n")
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["job", "overrides", "objective", *COLUMNS, "status"])
        writer.writeheader()
        writer.writerows(trials)
    return md, table


def log_trials_to_wandb(trials: list[dict], config: DictConfig, sweep_dir: Path) -> None:
    """A summary run in the sweep's W&B group holding the trials table. Never raises."""
    from src.utils.loggers import log_wandb_table

    columns = ["job", "overrides", "objective", *COLUMNS, "status"]
    best = next((t for t in trials if t["objective"] is not None), None)
    summary = {"best_objective": best["objective"], "best_overrides": best["overrides"]} if best else {}
    log_wandb_table((config.get("logger") or {}).get("wandb"), sweep_dir, "trials", "sweep-summary", "trials",
                    columns, [[t[c] for c in columns] for t in trials], summary)


class TrialsReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        objective = str(config.get("objective", "knn_top1"))
        if not sweep_dir.is_dir():
            return
        trials = collect_trials(sweep_dir, objective)
        if not trials:
            return
        md, table = write_trials(trials, sweep_dir, objective)
        log_trials_to_wandb(trials, config, sweep_dir)
        print(f"\ntrials of {sweep_dir} (objective {objective}, best first; every trial: "
              f"{' '.join(shared_overrides(trials))}):\n\n{trials_markdown(trials, objective)}"
              f"\n\ntrials: {md} and {table}", flush=True)
