"""The results page of `python -m src.bench.quality` (docs/results.md): its tables, texts and the hand-written notes it
keeps, rendered from the runs (:class:`src.bench.quality.MethodRun`) and the raw-pixel baseline."""

from __future__ import annotations

import re

GRAY_DATA, COLOUR_DATA = "fashion_mnist", "cifar10"
VIT = "vit_cpu"
TOKENIZER_ENTRY = "vqvae"
NOTES_HEADING = "## Notes"
NOTES_MARKER = "<!-- notes: written by hand after the run -->"
EUCLID_K = 5


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


def verdicts(run, raw_knn: float | None) -> tuple[str, str]:
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


def render_markdown(runs: list, baseline: dict | None, meta: dict, notes: str = "") -> str:
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
        f"on real Fashion-MNIST{colour_note} with the same backbone (`convnet`, 32/64/128 channels, its last map pooled over a 4x4 grid as "
        f"conf/fit/data/ fits it to Fashion-MNIST: 2,048-d features; rotation keeps the global pool: 128-d; "
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
        bench = " ".join(f"`{o}`" for o in run.bench) if run.bench else "none"
        fit = "; ".join(run.fitted) if run.fitted else "none"
        reused = " (result reused from an earlier run of the same budget)" if run.reused else ""
        lines.append(f"- **{run.method}**: `{' '.join(run.overrides)}`; this budget's overrides: {bench}; what a plain "
                     f"CPU run also gets (conf/fit/): {fit}{reused}")
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


def _table(runs: list, raw_knn: float | None) -> list[str]:
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


def _image_text_table(runs: list) -> list[str]:
    keys = ["zeroshot_top1", "zeroshot_top5", "random_zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5",
            "random_i2t_r1", "random_t2i_r1"]
    lines = ["| method | zero-shot top-1 | zero-shot top-5 | random zero-shot top-1 | image->text R@1 | image->text R@5 "
             "| text->image R@1 | text->image R@5 | random image->text R@1 | random text->image R@1 |",
             "| --- |" + " ---: |" * len(keys)]
    for run in runs:
        lines.append(f"| {run.method} | " + " | ".join(_num(run.results.get(k)) for k in keys) + " |")
    return lines


def format_stdout_table(runs: list, baseline: dict | None) -> str:
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
