"""`python -m src.eval CKPT [overrides]`: evaluate a saved checkpoint's frozen representation.

The checkpoint's own run config (``<run>/.hydra/overrides.yaml``, two folders up from ``CKPT``) is
composed first, then the overrides (e.g. ``data=...`` or ``eval.final.k=20``). The file is loaded safely
(``torch.load(weights_only=True)``: tensors and plain values only, nothing is executed), the method is
built from the config and its weights must match the checkpoint exactly; a checkpoint of another
backbone or method is one clear line. The evaluation is the run's final one (weighted kNN and a linear
probe, from ``eval.final``; for CLIP also zero-shot accuracy on the data's classes and retrieval on its held-out
pairs); results go to stdout and to ``CKPT`` + ``.eval.json``.

`python -m src.eval backbone=... [backbone.pretrained=FILE] [overrides]` (no checkpoint) measures a bare backbone the
same way: random weights, or weights downloaded elsewhere (timm, torchvision, DINO, MAE, MoCo files; see
src/backbones/pretrained.py); results go to stdout and, with a weights file, to ``FILE`` + ``.eval.json``.

``protocol=<name>[,<name>...]`` runs evaluation protocols of :mod:`src.protocols` instead (knn, linear, finetune,
fewshot, plot), each beside a random-init model of the same architecture; settings are ``protocols.<name>.*``, or
the bare key when one protocol is named (``protocol=finetune label_fraction=0.01``). Each writes
``<checkpoint stem>.<tag>.json`` (e.g. ``last.finetune_1pct.json``) beside the checkpoint or weights file, prints a
table, and, when the checkpoint's run logged to W&B, adds its figures to that W&B run.

``--check`` composes, loads and checks everything (the file, the config, the data, the weights against the model) and
stops: nothing is measured or written.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.callbacks.final_eval import FinalEvaluation
from src.config.command_line import problems_for
from src.config.compose import CONF_DIR, compose
from src.protocols import Subject, run_protocols
from src.protocols.features import autocast_context
from src.protocols.image_text import has_text_tower
from src.utils.checkpointing import (
    build_backbone,
    build_method,
    epochs_trained,
    load_checkpoint,
    load_weights,
)
from src.utils.errors import UserError, fail, one_line_errors
from src.utils.io import write_json_atomic
from src.utils.results import format_comparison, format_table

USAGE = ("usage: python -m src.eval path/to/last.ckpt [protocol=knn|linear|finetune|fewshot|plot|segment|image_text] "
         "[overrides such as data=...] [--check], or python -m src.eval backbone=... [backbone.pretrained=/path/to/weights] "
         "[protocol=...] [data=...] for a backbone without a checkpoint; --check: load and check, measure nothing")


def run_overrides(ckpt: Path) -> list[str]:
    """The command-line overrides the checkpoint's run was started with ([] without a run folder); a group
    chosen again on the command line (e.g. ``backbone=resnet18``) drops the run's settings of that group."""
    saved = ckpt.resolve().parent.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return []
    skip = ("resume=", "ckpt_path=", "hydra.", "+eval.")  # continuation and test-only keys are not the model
    return [o for o in OmegaConf.load(saved) if not str(o).startswith(skip)]


def evaluate(ckpt: Path, overrides: list[str], protocols: list[str] = (), check: bool = False) -> dict:
    if not ckpt.is_file():
        raise UserError(f"{ckpt} is not a file; pass the path of a checkpoint such as outputs/<run>/checkpoints/last.ckpt")
    groups = {o.split("=", 1)[0] for o in overrides if "=" in o and "." not in o.split("=", 1)[0]}
    saved = [o for o in run_overrides(ckpt) if o.split("=", 1)[0].split(".")[0].lstrip("+~") not in groups]
    state = load_checkpoint(ckpt)  # before any config problem: a bad file is the first thing to report
    problems = problems_for([*saved, *overrides])
    if problems:
        raise UserError("\n".join(problems))
    cfg = compose([*saved, *overrides], return_hydra_config=True)  # hydra.runtime.choices: the groups' options
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, fresh=True)  # its weights are the checkpoint's
    load_weights(method, state, ckpt)
    choices = cfg.hydra.runtime.choices
    names = {group: choices.get(group) for group in ("method", "backbone", "data")}
    head = {"checkpoint": str(ckpt), **names, "epochs": epochs_trained(state), "global_step": state.get("global_step")}
    if check:
        return head
    return {**head, **evaluate_model(method, method.views, cfg, protocols, lambda: build_method(cfg, fresh=True), ckpt)}


def evaluate_backbone(overrides: list[str], protocols: list[str] = (), check: bool = False) -> dict:
    """The same evaluation of a bare backbone (no checkpoint): random weights, or weights downloaded elsewhere
    (``backbone=vit_small backbone.pretrained=dino_deitsmall16_pretrain.pth``)."""
    problems = problems_for(overrides)
    if problems:
        raise UserError("\n".join(problems))
    cfg = compose(overrides, return_hydra_config=True)  # with hydra.runtime.choices: which option of each group
    choices = cfg.hydra.runtime.choices
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(cfg.backbone)
    weights = cfg.backbone.get("pretrained")
    head = {"weights": weights or "random initialisation", "backbone": choices.get("backbone"), "data": choices.get("data")}
    random = lambda: build_backbone(cfg.backbone, fresh=True)  # noqa: E731 - the same backbone, its own initialisation
    if getattr(backbone, "image_text", None) is not None and choices.get("method") == "clip":  # a CLIP snapshot:
        backbone = instantiate(cfg.method, backbone=backbone, views=instantiate(cfg.views))  # both towers (zero-shot)
        random = lambda: build_method(cfg, fresh=True)  # noqa: E731
    if check:
        return head
    return {**head, **evaluate_model(backbone, instantiate(cfg.views), cfg, protocols, random,
                              Path(weights) if weights else None)}


def eval_device(cfg) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")


def evaluation_data(cfg, model):
    """The data module of ``cfg.data``, set up; without labels only a model with a text tower has something to be
    measured on (retrieval), else one line."""
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    if not dm.has_labels and not has_text_tower(model):
        raise UserError(f"data={dm.name} has no labels here, so there is nothing to evaluate against")
    return dm


def evaluate_model(model, views, cfg, names: list[str], random_model, source: Path | None) -> dict:
    """The run's final evaluation (``eval.final``: kNN, linear probe, held-out figures, image–text figures, its
    ``protocols``; the defaults where the run turned it off), or the protocols ``names``, on ``model`` and beside
    it on ``random_model()``, with the run's device and precision. Results files beside ``source`` (a checkpoint or
    weights file: ``<stem>.<tag>.json``, pictures ``<stem>.<what>.png``; None: stdout only)."""
    from src.utils.loggers import log_to_run_wandb

    device = eval_device(cfg)
    model.to(device).eval()
    dm = evaluation_data(cfg, model)
    start = time.time()
    folder, stem = (source.parent, source.name.split(".")[0]) if source is not None else (None, None)
    drawn: list[tuple[str, Path]] = []

    def picture(what: str) -> Path:
        drawn.append((what, folder / f"{stem}.{what}.png"))
        return drawn[-1][1]

    def subject(m, name: str) -> Subject:
        return Subject(m, views, dm, device, int(cfg.seed), out_dir=folder, pictures=picture if folder else None,
                       forward_context=autocast_context(cfg.trainer.precision, device), name=name)

    out = (lambda tag: folder / f"{stem}.{tag}.json") if folder is not None else None
    if names:
        protocols = [instantiate(cfg.protocols[name]) for name in names]
        results = run_protocols(protocols, subject(model, "trained"),
                                lambda: subject(random_model().to(device), "random"), out)
        results = {"eval_train_split": dm.eval_split_names[0], "eval_val_split": dm.eval_split_names[1], **results}
    else:
        node = cfg.eval.get("final") or compose(["eval=default"]).eval.final  # a run without one: the defaults
        final = FinalEvaluation.from_config(cfg, random_model, node)
        results = final.evaluate(subject, model, dm, out)
    results["wall_time_s"] = round(time.time() - start, 1)
    if source is not None and source.suffix == ".ckpt":  # the run's own W&B run, when it had one
        log_to_run_wandb(cfg, source.resolve().parent.parent, results, drawn)
    return results


def protocol_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(protocol names, the other arguments)``: ``protocol=a,b`` is taken out; with one protocol, a bare key of its
    settings (``label_fraction=0.01``) becomes ``protocols.<name>.<key>``. Unknown names are one line."""
    from src.config.compose import group_options

    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("protocol=")]
    names = [n.strip() for value in chosen for n in value.split(",") if n.strip()]
    known = group_options("protocol")
    for name in names:
        if name not in known:
            raise UserError(f"protocol={name} is not a protocol; allowed: {', '.join(known)}")
    rest = [a for a in argv if not a.startswith("protocol=")]
    if len(names) == 1:
        from src.config.keys import top_level_keys

        fields = set(OmegaConf.load(CONF_DIR / "protocol" / f"{names[0]}.yaml").keys()) - {"_target_"}
        for a in rest:
            key = a.split("=", 1)[0] if "=" in a else None
            if key and "." not in key and key.isidentifier() and key not in fields | top_level_keys():
                raise UserError(f"{key}: not a setting of protocol {names[0]}; allowed: {', '.join(sorted(fields))}")
        rest = [f"protocols.{names[0]}.{a}" if "=" in a and a.split("=", 1)[0] in fields else a for a in rest]
    return names, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv  # compose, load and check everything, then stop (nothing is measured or written)
    argv = [a for a in argv if a != "--check"]
    if not argv or argv[0].startswith("-"):
        fail([USAGE])
    bare = "=" in argv[0]  # no checkpoint: a backbone, random or from backbone.pretrained
    with one_line_errors():  # also a weights file that does not fit the backbone (refused by its constructor)
        protocols, argv = protocol_arguments(argv)
        results = (evaluate_backbone(argv, protocols, check) if bare
                   else evaluate(Path(argv[0]), argv[1:], protocols, check))
    if check:
        print(f"checked: {results} ({', '.join(protocols) or 'the final evaluation'} would run)", flush=True)
        return
    if protocols:
        print(format_comparison(results), flush=True)
        return
    source = results.get("checkpoint") or (results["weights"] if results["weights"] != "random initialisation" else None)
    out = None
    if source:
        out = Path(source).with_name(Path(source).name + ".eval.json")
        write_json_atomic(out, results)
    print(format_table(results) + (f"\n\nresults: {out}" if out else ""), flush=True)


if __name__ == "__main__":
    main()
