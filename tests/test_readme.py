"""Every command in README.md and docs/*.md works as written, so a renamed key or group fails here, not for a user.

Each ``python -m src.<command> ...`` and ``make <target> ...`` line (in code blocks, and in backticks in the prose)
is read, its placeholders (``outputs/<run>``, ``/path/to/photos``, ...) are filled with things this test builds (a
tiny trained run, an image folder, a caption file), and:

- every command composes and passes its pre-flight (``src.train``: the command-line check; ``src.eval``:
  ``--check``, which also loads the checkpoint against the model); a command marked ``[gpu]``, ``[cluster]`` or
  ``[download]`` in its comment may instead be refused, in one line (it cannot run on this machine), and one marked
  ``[long]`` (a whole sweep, a benchmark) is checked, not run;
- ``make <target>`` names a target of the Makefile, and its ``ARGS`` pass the pre-flight like the command they become;
- the ``src.train`` commands that can run here run for two steps (``@slow``), and ``src.embed``, ``src.export``,
  ``src.search`` and ``src.report`` on the tiny run; ``src.eval`` commands stop at ``--check`` (their protocols are
  tested in test_protocols.py) and ``src.bench`` ones (hours each) are checked to name a module.
"""

from __future__ import annotations

import re
import shlex

import pytest
import torch
from PIL import Image

from src.config.command_line import command_problems
from tests.helpers import ROOT, run_cli, run_module

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKS = ("gpu", "cluster", "download", "long", "refused")
COMMAND = re.compile(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*(python -m src\.[\w.]+|make [a-z-]+)(.*)$")
INLINE = re.compile(r"`((?:python -m src\.[\w.]+|make [a-z-]+)[^`]*)`")


def documented_commands() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, command, marks) for every command of the docs, continuation lines joined, comments dropped."""
    found = []
    for doc in DOCS:
        lines, block = doc.read_text().splitlines(), False
        i = 0
        while i < len(lines):
            line, where = lines[i].strip(), f"{doc.name}:{i + 1}"
            if line.startswith("```"):
                block = not block
            elif block and COMMAND.match(line):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1].rstrip() + " " + lines[i].strip()
                command, comment = split_comment(COMMAND.match(line).group(1) + COMMAND.match(line).group(2))
                found.append((where, command, tuple(m for m in MARKS if f"[{m}]" in comment)))
            elif not block:  # in the prose: whole commands only (not `python -m src.eval` as a name, nor a sketch
                marks = tuple(m for m in MARKS if f"[{m}]" in line)  # with [...] options or ...)
                found += [(where, m, marks) for m in INLINE.findall(line)
                          if len(m.split()) > 3 and not any(c in m for c in ("...", "[", "|", "<other>"))]
            i += 1
    return found


def split_comment(text: str) -> tuple[str, str]:
    """(command, comment): a ``#`` after whitespace and outside quotes starts the comment."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and i and text[i - 1].isspace():
            return text[:i].strip(), text[i:]
    return text.strip(), ""


COMMANDS = documented_commands()


def test_the_docs_hold_the_commands_a_newcomer_runs():
    tools = {cmd.split()[2] if cmd.startswith("python") else cmd.split()[1] for _, cmd, _ in COMMANDS}
    assert {"src.train", "src.eval", "src.embed", "src.export", "src.search", "src.report", "train", "test"} <= tools
    assert len(COMMANDS) >= 40, COMMANDS


# ---- what the placeholders stand for ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Everything the commands' placeholders name, built here: a tiny trained run (and a tiny CLIP run) with their
    checkpoints, an image folder of two classes, a caption file, the BEiT tokenizer."""
    root = tmp_path_factory.mktemp("readme")
    folder = root / "photos"  # a class-per-folder tree with train/ and val/, as data=imagefolder reads it
    for split, count in (("train", 70), ("val", 6)):  # 140 training images: one batch of the default 128
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            (folder / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = (torch.rand(32, 32, 3) * 60 + torch.tensor(colour)).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / split / f"class{c}" / f"{i}.png")
    captions = root / "pairs.csv"
    captions.write_text("image,caption\n" + "".join(f"{p},a photo of class {p.parent.name[-1]}\n"
                                                   for p in sorted(folder.rglob("*.png"))))
    tiny = ("data=digits", "backbone.width=8", "data.batch_size=128", "trainer.max_epochs=1", "method.warmup_epochs=0",
            "eval=final_only", "eval.final.linear_epochs=5")
    run, clip = root / "runs" / "run", root / "runs" / "clip"
    for where, extra in ((run, ()), (clip, ("method=clip", "method.context_length=16", "method.text_width=32",
                                            "method.text_heads=2", "method.text_layers=1",
                                            "eval.final.random_baseline=false"))):  # src.search reads its checkpoint
        proc = run_cli(*tiny, *extra, f"hydra.run.dir={where}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = root / "tokenizer"  # the README's first BEiT step, for two steps: BEiT then reads its checkpoint
    proc = run_cli("method=vqvae", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval=none", "logger=none",
                   f"hydra.run.dir={tokenizer}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"run": run, "clip": clip, "runs": run.parent, "folder": folder, "captions": captions, "root": root,
            "tokenizer": tokenizer}


def fill(command: str, places: dict) -> str:
    """The command with its placeholders replaced by what :func:`places` built; a placeholder with no filling is
    left, and fails the test that meets it."""
    p = {k: str(v) for k, v in places.items()}
    for pattern, value in [
        (r"outputs/<clip run>", p["clip"]), (r"outputs/<run>", p["run"]),
        (r"(?<=src\.eval )CKPT", f"{p['run']}/checkpoints/last.ckpt"), (r"outputs/multirun/<date>", p["runs"]),
        (r"outputs/tokenizer", p["tokenizer"]),
        (r"method=<m>", "method=simclr"),  # "every method as method=<m>": one of them
        (r"/path/to/photos|/path/to/images|(?<=--images )DIR|(?<=--images )photos/", p["folder"]),
        (r"data\.root=(/path/to/folder|DIR|/path/to/data)", f"data.root={p['folder']}"),
        (r"/path/to/pairs\.csv|/data/pairs\.csv", p["captions"]),
        (r"(?<=--out )photos\.(npy|parquet|csv|pt)", f"{p['root']}/photos.\\1"),
    ]:
        command = re.sub(pattern, value, command)
    return command


def unfilled(command: str) -> list[str]:
    return re.findall(r"<[a-z ]+>|/path/to/\S*", command)


def arguments(command: str) -> tuple[str, list[str]]:
    words = shlex.split(command)
    return (words[2], words[3:]) if words[0] == "python" else (f"make {words[1]}", words[2:])


# ---- checked: every command up to its pre-flight ------------------------------------------------------------
def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.mark.parametrize(("where", "command", "marks"), COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_the_command_passes_its_preflight(where, command, marks, places):
    command = fill(command, places)
    assert marks or not unfilled(command), f"{where}: no filling for {unfilled(command)} in {command}"
    tool, args = arguments(command)
    if tool.startswith("make "):
        target = tool.split()[1]
        assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.MULTILINE), f"{where}: {tool}"
        given = [a.split("=", 1)[1] for a in args if a.startswith("ARGS=")]
        if target == "train" and given:
            args, tool = shlex.split(given[0]), "src.train"
        else:
            return
    if tool == "src.train":
        problems = command_problems(args)
    elif tool == "src.eval":
        proc = run_module("src.eval", *args, "--check")
        problems = lines(proc.stderr) if proc.returncode else []
    elif tool.startswith("src.bench."):  # benchmarks (hours): the module exists; its pages hold its figures
        import importlib.util

        assert importlib.util.find_spec(tool), f"{where}: no module {tool}"
        return
    else:
        return  # embed, export, search, report: run on the tiny run (test_the_command_runs)
    if "refused" in marks:  # an example of a refusal: exactly one line
        assert len(problems) == 1 and "Traceback" not in problems[0], f"{where}: {command}: {problems}"
    elif marks and problems:  # not on this machine: said in one line each, and never a mistake in the command
        assert not any("Traceback" in p or p.startswith(("unknown", "cannot parse")) or " must be " in p
                       for p in problems), f"{where}: {command}: {problems}"
    else:
        assert problems == [], f"{where}: {command}: {problems}"


# ---- run: what can run here, for a step or two -------------------------------------------------------------
SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "eval=none", "logger=none"]
SMALL_PROTOCOLS = ["protocols.fewshot.episodes=2", "protocols.fewshot.shots=[1,5]", "protocols.plot.max_items=150"]


def no_baseline(args: list[str]) -> list[str]:  # the random-init twin doubles a run's evaluation
    return [] if any(a.startswith("eval.final.random_baseline") for a in args) else ["eval.final.random_baseline=false"]


RAN = ("src.train", "src.embed", "src.export", "src.search", "src.report")  # src.eval: --check above; src.bench: hours
RUNNABLE = list({c: (w, c, m) for w, c, m in reversed(COMMANDS) if c.split()[2:3] and c.split()[2] in RAN and not m
                 and not re.search(r" (-m|--multirun|hparams_search=\S+)( |$)", " " + c.split(None, 3)[-1])}.values())[::-1]


@pytest.mark.slow
@pytest.mark.parametrize(("where", "command", "marks"), RUNNABLE, ids=[w for w, _, _ in RUNNABLE])
def test_the_command_runs(where, command, marks, places, tmp_path):
    tool, args = arguments(fill(command, places))
    if tool == "src.train":  # a command that sets evaluation keys keeps its evaluation, on the small digits
        smoke = [*SMOKE[:2], "logger=none", "data=digits", *SMALL_PROTOCOLS, *no_baseline(args)] if any(
            a.startswith("eval.") for a in args) else SMOKE
        proc = run_cli(*args, *smoke, f"hydra.run.dir={tmp_path}/run")
        assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr[-3000:]}"
    elif tool in ("src.embed", "src.export", "src.search", "src.report"):
        args = [a.replace(f"{places['root']}/photos.", f"{tmp_path}/photos.") for a in args]
        proc = run_module(tool, *args)
        assert proc.returncode == 0, f"{where}: {command}\n{proc.stderr[-3000:]}"
