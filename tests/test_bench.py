"""The quality benchmark's bookkeeping (no training here): method list, commands, the results page."""

import json
from pathlib import Path

from src.bench import quality as q
from src.bench import quality_page as qp

RESULTS = {"knn_top1": 80.0, "linear_top1": 85.0, "random_knn_top1": 67.5, "random_linear_top1": 81.5,
           "train_images_per_s": 140.0, "wall_time_s": 600.0, "eval_train_items": 10000,
           "eval_val_items": 10000, "eval_val_split": "test"}
BASELINE = {"knn_top1": 77.92, "k": 200, "temperature": 0.07, "bank": 10000, "queries": 10000, "mean": [0.286],
            "std": [0.353], "euclid_top1": 85.54, "euclid_k": 5, "euclid_train": 60000, "euclid_queries": 10000}
META = {"epochs": 10, "train_samples": 10240, "seed": 0, "command": "python -m src.bench.quality",
        "date": "2026-01-01 00:00 UTC", "commit": "abc", "machine": "2 CPU cores"}


def test_methods_and_command():
    methods = q.default_methods()
    assert "moco" not in methods and {"simclr", "moco_v1", "moco_v2"} <= set(methods)
    cmd = q.run_command("simclr", Path("/tmp/o"), 3, 512, 1, ["eval.final.linear_epochs=5"])
    assert cmd[1:3] == ["-m", "src.train"] and "hydra.run.dir=/tmp/o/simclr" in cmd
    assert cmd[-1] == "eval.final.linear_epochs=5"
    assert q.overrides_of(cmd) == ["method=simclr", "data=fashion_mnist", "backbone=convnet",
                                   "trainer.max_epochs=3", "data.max_train_samples=512", "seed=1",
                                   "logger=csv", *q.BENCH_OVERRIDES["simclr"], "eval.final.linear_epochs=5"]


def test_last_error_line():
    log = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\nEpoch 0\r\n"
    assert q.last_error_line(log) == "RuntimeError: boom"
    assert q.last_error_line("noise\nerror: unknown method 'x'\nmore\n") == "error: unknown method 'x'"


def test_page_marks_failures_and_keeps_notes():
    ok = q.MethodRun("simclr", ["method=simclr"], results=RESULTS, optimizer="LARS (lr 0.3)", views="simclr")
    bad = q.MethodRun("byol", ["method=byol"], error="exit 1: RuntimeError: a | b")
    page = q.render_markdown([ok, bad], BASELINE, META)
    assert "| simclr | 80.00 | 85.00 | 67.50 | 81.50 | yes | yes (+2.08) | 140 | 600 | — |" in page
    assert "| byol | **failed**: exit 1: RuntimeError: a \\| b |" in page
    assert "need colour" not in page
    assert "85.54" in page and "77.92" in page
    assert page.rstrip().endswith(qp.NOTES_MARKER)
    assert q.existing_notes(page) == ""

    edited = page + "\nByol failed because of X.\n\n### More\n- y\n"
    notes = q.existing_notes(edited)
    assert notes == "Byol failed because of X.\n\n### More\n- y"
    again = q.render_markdown([ok], BASELINE, META, notes)
    assert again.count(qp.NOTES_HEADING) == 1 and again.count(qp.NOTES_MARKER) == 1
    assert q.existing_notes(again) == notes


def test_colour_methods_run_on_colour_data_or_say_why_not(tmp_path):
    assert q.data_for("colorization") == q.COLOUR_DATA and q.data_for("split_brain") == q.COLOUR_DATA
    assert q.data_for("rotation") == q.GRAY_DATA and q.data_for("simclr") == q.GRAY_DATA
    missing = q.colour_data_missing([f"data.root={tmp_path}"])  # an empty folder holds no CIFAR-10
    assert missing is not None and "cifar10 is not on this machine" in missing
    rot = q.MethodRun("rotation", ["method=rotation"], results={**RESULTS, "pretext_acc": 91.5})
    col = q.MethodRun("colorization", ["method=colorization"], skipped=missing, data=q.COLOUR_DATA)
    page = q.render_markdown([rot, col], BASELINE, META)
    assert "| rotation | 80.00 | 85.00 | 67.50 | 81.50 | yes | yes (+2.08) | 140 | 600 | 91.50 |" in page
    colour_section = page.split("## Methods that need colour images (cifar10)")[1].split("## Raw-pixel")[0]
    assert "| colorization | not run: cifar10 is not on this machine" in colour_section
    assert not col.ok and "colorization" not in page.split("## Methods that need colour")[0].split("| --- |")[1]


def test_vit_entries_run_on_the_vit_and_beit_reads_the_tokenizer(tmp_path):
    methods = q.default_methods()
    assert "mae" not in methods and "beit" not in methods and "vqvae" in methods
    assert methods[-6:] == ["mae@vit_cpu", "beit@vit_cpu", "dino@vit_cpu", "ibot@vit_cpu", "dinov2@vit_cpu",
                            "moco_v3@vit_cpu"]
    assert methods.index("vqvae") < methods.index("beit@vit_cpu")
    cmd = q.run_command("beit@vit_cpu", tmp_path, 3, 512, 0, [])
    assert cmd[3:6] == ["method=beit", "data=fashion_mnist", "backbone=vit_cpu"]
    assert f"method.tokenizer={tmp_path}/vqvae/checkpoints/last.ckpt" in cmd
    assert f"hydra.run.dir={tmp_path}/beit_vit_cpu" in cmd
    why = q.missing_requirement("beit@vit_cpu", [], tmp_path)
    assert "needs the checkpoint of the vqvae run" in why
    failed = q.MethodRun("vqvae", [], error="exit 1")
    assert "did not finish" in q.missing_requirement("beit@vit_cpu", [failed], tmp_path)
    (tmp_path / "vqvae" / "checkpoints").mkdir(parents=True)
    (tmp_path / "vqvae" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert q.missing_requirement("beit@vit_cpu", [], tmp_path) is None
    dino = q.MethodRun("dino@vit_cpu", ["method=dino"], results=RESULTS)
    page = q.render_markdown([q.MethodRun("simclr", ["method=simclr"], results=RESULTS), dino], BASELINE, META)
    vit_section = page.split("## Vision Transformers (`vit_cpu`)")[1].split("## Raw-pixel")[0]
    assert "| dino@vit_cpu | 80.00 | 85.00 |" in vit_section and "dino@vit_cpu" not in page.split("## Vision")[0].split("| --- |")[1]


def test_the_defaults_page_shows_each_methods_plain_run_and_its_refusals():
    from src.bench import defaults

    assert defaults.command("beit", Path("/o"))[3:] == ["method=beit", "method.tokenizer=/o/vqvae/checkpoints/last.ckpt",
                                                         "hydra.run.dir=/o/beit"]
    fits = {"dino": ["CPU-sized (conf/fit/method/dino_cpu.yaml): method.out_dim 4096 instead of 65536; hardware=gpu ...",
                     "fitted to data=fashion_mnist (conf/fit/data/x.yaml): backbone.pool_grid 4 instead of 1; <key>=..."]}
    page = defaults.render({"dino": {**RESULTS, "backbone": "convnet", "wall_time_s": 700.0, "val_knn_top1": 79.0},
                            "colorization": {"error": "colorization needs RGB data"}}, fits, META)
    assert "| dino | convnet (pool_grid 4) | method.out_dim 4096 instead of 65536 | 700 (over 10 min) |" in page
    assert "yes (+12.50), yes (+3.50) |" in page and "| colorization | — | — | — | — | not run: colorization needs" in page


def test_the_defaults_page_can_be_written_from_the_runs_already_made(tmp_path):
    from src.bench import defaults

    (tmp_path / "simclr").mkdir()
    (tmp_path / "simclr" / "results.json").write_text(json.dumps({**RESULTS, "backbone": "convnet"}))
    (tmp_path / "colorization.log").write_text("error: Colorization needs colour (RGB) images\n")
    (tmp_path / "dino.log").write_text("Epoch 3 ...\n")  # a run under way: neither a result nor a refusal
    assert defaults.run("simclr", tmp_path, reuse=False, make=False)["knn_top1"] == RESULTS["knn_top1"]
    assert defaults.run("colorization", tmp_path, reuse=False, make=False) == {
        "error": "error: Colorization needs colour (RGB) images"}
    assert defaults.run("dino", tmp_path, reuse=False, make=False) == {}
    page = defaults.render({"dino": {}}, {}, META)
    assert "| dino | — | — | — | — | not measured yet |" in page
