"""The speed benchmark (src/bench/speed.py) on tiny settings: SimCLR on digits, batch 32, 2 timed steps."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from src.bench import speed

SETTINGS = speed.Settings(methods=["simclr"], data="digits", batch_size=32, steps=2, warmup=1, threads=2, workers=1,
                          extra=["+trainer.enable_progress_bar=false"])


@pytest.fixture(scope="module")
def rows():
    return speed.run(SETTINGS)


def test_framework_and_bare_are_measured(rows):
    (row,) = rows
    assert row.method == "simclr"
    assert row.framework > 0 and row.bare > 0
    assert row.vs_bare == pytest.approx(row.framework / row.bare)
    assert 0 < row.views_share and 0 <= row.wait_share < 1
    assert row.peak_mib > 0 and row.memory_kind == "cpu_peak_rss"
    table = speed.format_table(rows)
    assert table.splitlines()[2].startswith(f"| simclr | {row.framework:.1f} | {row.bare:.1f} |")
    assert f"| {row.vs_bare:.2f} |" in table


def test_lightly_column(rows):
    pytest.importorskip("lightly")
    (row,) = rows
    assert row.lightly is not None and row.lightly > 0, row.lightly_note
    assert row.vs_lightly == pytest.approx(row.framework / row.lightly)
    assert "SimCLRTransform" in row.lightly_note and "NTXentLoss" in row.lightly_note


def test_without_lightly_the_column_says_why(rows, monkeypatch):
    row = rows[0]
    missing = speed.Row(**{**row.__dict__, "lightly": None, "lightly_note": "lightly is not installed"})
    assert "| — | " in speed.format_table([missing])
    assert any("not measured (lightly is not installed)" in line for line in speed.target_lines([missing]))
    if importlib.util.find_spec("lightly") is None:
        assert row.lightly is None and "not installed" in row.lightly_note


def test_out_writes_and_replaces_its_section(rows, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    speed.write_section(page, speed.section(rows, SETTINGS, "python -m src.bench.speed --data digits"), "cpu")
    first = page.read_text()
    assert "## Other\n\nkept" in first and "## Speed: framework, bare PyTorch loop and lightly (CPU)" in first
    assert "python -m src.bench.speed --data digits" in first and "UTC" in first and "torch threads" in first
    assert "| simclr |" in first and "framework / bare" in first
    speed.write_section(page, "second run", "cpu")
    second = page.read_text()
    assert second.count("## Speed:") == 1 and "second run" in second and "| simclr |" not in second
    assert second.startswith("# Benchmarks\n\n## Other\n\nkept\n")


def test_warm_up_steps_are_not_timed():
    """The monitor subclass times (and logs) only the steps after the warm-up."""
    logged = []
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kw: logged.append(name))
    trainer, batch = SimpleNamespace(world_size=1), {"image": torch.zeros(4, 1, 2, 2)}
    monitor = speed.WarmThroughput(warmup=2)
    for step in range(5):
        monitor.on_train_batch_start(trainer, module, batch, step)
        monitor.on_train_batch_end(trainer, module, None, batch, step)
    assert logged == ["perf/images_per_s"] * 3
