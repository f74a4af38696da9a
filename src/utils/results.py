"""The run's final results: a table on stdout and results.json in the run folder."""

from __future__ import annotations

from pathlib import Path

from src.utils.io import write_json_atomic

ROWS = [
    ("method", "method"), ("backbone", "backbone"), ("data", "data"), ("epochs", "epochs"),
    ("knn_top1", "kNN top-1 (%)"), ("linear_top1", "linear top-1 (%)"),
    ("val_knn_top1", "kNN top-1 on held-out train images (%)"),
    ("random_knn_top1", "random-init kNN top-1 (%)"), ("random_linear_top1", "random-init linear top-1 (%)"),
    ("zeroshot_top1", "zero-shot top-1 (%)"), ("random_zeroshot_top1", "random-init zero-shot top-1 (%)"),
    ("i2t_r1", "image->text R@1 (%)"), ("t2i_r1", "text->image R@1 (%)"), ("random_i2t_r1", "random-init image->text R@1 (%)"),
    ("health_std_ratio", "feature std x sqrt(d), last check (~1 healthy)"), ("health_rankme", "RankMe, last check"),
    ("collapsed", "representation collapsed"),
    ("eval_val_split", "evaluated on split"), ("last_online_val_top1", "online probe top-1 (%), last epoch"),
    ("wall_time_s", "wall time (s)"), ("train_images_per_s", "training images/s"),
    ("data_wait_fraction", "share of time waiting for data"), ("peak_memory_mib", "peak memory (MiB)"),
]


def format_table(results: dict) -> str:
    rows = [(label, results[key]) for key, label in ROWS if key in results and results[key] is not None]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'result':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for label, value in rows:
        value = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<{width}}  {value}")
    return "\n".join(lines)


def write_results(results: dict, run_dir: Path) -> Path:
    return write_json_atomic(Path(run_dir) / "results.json", results)


def format_comparison(results: dict) -> str:
    """Protocol results as a table: one row per figure, the random-init model's (``random_<key>``) beside it."""
    keys = [k for k in results if not k.startswith("random_") and k not in {"wall_time_s"}]
    width = max(len(k) for k in keys) if keys else 6

    def show(v) -> str:
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [f"{'result':<{width}}  {'value':>12}  {'random-init':>12}", f"{'-' * width}  {'-' * 12}  {'-' * 12}"]
    for k in keys:
        lines.append(f"{k:<{width}}  {show(results[k]):>12}  {show(results.get('random_' + k)):>12}")
    lines.append(f"{'wall_time_s':<{width}}  {show(results.get('wall_time_s')):>12}")
    return "\n".join(lines)
