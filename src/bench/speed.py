"""`python -m src.bench.speed`: the framework's training step beside a bare PyTorch loop and lightly's pipeline.

For each method, in one process, on the same network (one instantiated method), the same optimizer (the method's
``configure_optimizers``) and the same batch size, after ``--warmup`` untimed steps each:

- **framework**: the run as ``python -m src.train`` builds it (the project's ``compose``, ``check_config``, the
  callbacks of :func:`src.train.build_callbacks` with ``eval=none``, the CSV logger, a Lightning ``Trainer``),
  views made on the device in ``on_after_batch_transfer``; the figures come from the
  :class:`~src.callbacks.throughput.ThroughputMonitor` of that callback list (warm-up steps left out);
- **bare**: the method's own ``training_loss(views)``, ``backward``, optimizer and LR-schedule step and EMA update
  in a plain loop, on views made once before timing: no Lightning, no data loading, no view making (the ceiling);
- **lightly**: lightly's transform for the method (``SimCLRTransform`` for SimCLR, ...) with our recipe's crop,
  flip, jitter, grayscale and blur settings, in ``DataLoader`` workers over the same images as PIL images,
  lightly's loss, each view through the same backbone and head separately (as lightly's examples do).

Images/s counts images, not views. The framework and lightly figures are end to end: images over the time of
the timed steps including the wait for the next batch (the framework's wait comes from the throughput monitor:
``train_images_per_s x (1 - data_wait_fraction)``). The share of time making views times ``views(images)``
alone on one batch (CUDA synchronised) over the framework's time per batch. Peak memory: CUDA memory allocated
on a GPU, else the process's peak RSS, reset before each measurement where Linux allows it.

Absolute figures only mean something on the machine named in the output (a shared 2-core machine is noisy);
compare the ratios, measured in one run. ``--out FILE`` replaces (or appends) this device's section of
``FILE`` and keeps everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from src.callbacks.throughput import ThroughputMonitor, peak_memory, synced_clock
from src.config.compose import compose
from src.config.rules import check_config
from src.nn.ema import update_momentum
from src.train import build_callbacks, build_parts, build_trainer
from src.utils.io import write_text_atomic
from src.utils.loggers import build_loggers, finish_loggers

TARGET_BARE = 0.85  # framework >= 85% of the bare loop's images/s
TARGET_LIGHTLY = 1.5  # framework >= 1.5x lightly's images/s
NONE = "—"


@dataclass
class Settings:
    """What one benchmark run measures (the command-line options)."""

    methods: list[str] = field(default_factory=lambda: ["simclr"])
    backbone: str = "convnet"
    data: str = "fashion_mnist"
    batch_size: int = 256
    steps: int = 30
    warmup: int = 5
    device: str = "cpu"
    threads: int = 2
    workers: int = 2  # lightly's DataLoader workers
    rounds: int = 1
    extra: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One method's figures; ``None`` where a column was not measured (``lightly_note`` says why)."""

    method: str
    framework: float
    bare: float
    lightly: float | None
    views_share: float
    wait_share: float
    peak_mib: float
    bare_peak_mib: float
    memory_kind: str
    lightly_note: str = ""

    @property
    def vs_bare(self) -> float:
        return self.framework / self.bare

    @property
    def vs_lightly(self) -> float | None:
        return self.framework / self.lightly if self.lightly else None


# ---- clocks and memory ------------------------------------------------------------------------------
def now(device: torch.device) -> float:
    """A clock reading after the device's queued work is done."""
    return synced_clock(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mib(device: torch.device) -> float:
    """The peak since :func:`reset_peak_memory`, in MiB (CPU: peak RSS, as the throughput monitor reads it)."""
    return peak_memory(device)[0]


def autocast(cfg: DictConfig, device: torch.device):
    """The mixed precision the framework's ``trainer.precision`` gives, for the loops outside Lightning."""
    precision = str(cfg.trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---- (a) the framework ------------------------------------------------------------------------------
class WarmThroughput(ThroughputMonitor):
    """The framework's throughput monitor, blind to the first ``warmup`` training steps (their wait included)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup, self._seen, self._timing = warmup, 0, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._timing = self._seen >= self.warmup
        if self._timing:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._timing:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._seen += 1


def bench_config(method: str, s: Settings) -> DictConfig:
    """The run's config, composed as ``python -m src.train`` composes it, plus the benchmark's overrides."""
    hardware = "gpu" if s.device == "cuda" else "cpu"
    return compose([f"method={method}", f"backbone={s.backbone}", f"data={s.data}", f"hardware={hardware}",
                    f"data.batch_size={s.batch_size}", "eval=none", "logger=csv",
                    f"+trainer.max_steps={s.warmup + s.steps}", *s.extra])


def build_method(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule]:
    """The datamodule and method, instantiated as :func:`src.train.train` does."""
    check_config(cfg)
    datamodule, method = build_parts(cfg)
    return method, datamodule


def framework_run(cfg: DictConfig, method, datamodule, warmup: int, run_dir: Path, device: torch.device) -> dict:
    """Fit ``warmup + steps`` steps with the framework's callbacks, logger and ``Trainer``; the throughput
    monitor's results of the timed steps."""
    callbacks = [WarmThroughput(warmup) if isinstance(c, ThroughputMonitor) else c
                 for c in build_callbacks(cfg, run_dir)]
    loggers = build_loggers(cfg.logger, run_dir, "bench")
    trainer = build_trainer(cfg, method, callbacks, loggers, run_dir)
    reset_peak_memory(device)
    trainer.fit(method, datamodule=datamodule)
    finish_loggers(loggers, ok=True)
    return next(c for c in callbacks if isinstance(c, WarmThroughput)).results


# ---- (b) the bare loop ------------------------------------------------------------------------------
def first_batch(datamodule, batch_size: int) -> torch.Tensor:
    """The first ``batch_size`` pre-training images (uint8, as the loader yields them)."""
    return torch.stack([datamodule.pretrain[i][0] for i in range(batch_size)])


def views_seconds(method, images: torch.Tensor, repeats: int) -> float:
    """Mean time of one ``views(images)`` call (after one untimed call)."""
    method.make_views(images)
    start = now(images.device)
    for _ in range(repeats):
        method.make_views(images)
    return (now(images.device) - start) / repeats


def optimizer_of(method):
    """The method's optimizer and per-step LR schedule, built by its own ``configure_optimizers`` (it reads the
    trainer of the last framework run: effective batch, total steps)."""
    conf = method.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def bare_step(method, optimizer, schedule, views: list[torch.Tensor], step: int, precision) -> None:
    """What the framework's step computes: loss, backward, frozen gradients dropped, optimizer and LR step, EMA."""
    with precision:
        out = method.training_loss(views)
    loss = out[0] if isinstance(out, tuple) else out
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in method.frozen_parameters():
        p.grad = None
    optimizer.step()
    schedule.step()
    for online, target in method.momentum_pairs():
        update_momentum(online, target, method.ema_momentum(step))


def bare_run(method, images: torch.Tensor, s: Settings, precision) -> tuple[float, float]:
    """Images/s of :func:`bare_step` on views made once before timing, and the peak memory (MiB)."""
    device = images.device
    torch.manual_seed(0)
    views = method.make_views(images)
    optimizer, schedule = optimizer_of(method)
    reset_peak_memory(device)
    for step in range(s.warmup):
        bare_step(method, optimizer, schedule, views, step, precision)
    start = now(device)
    for step in range(s.warmup, s.warmup + s.steps):
        bare_step(method, optimizer, schedule, views, step, precision)
    return s.steps * images.shape[0] / (now(device) - start), peak_memory_mib(device)


# ---- (c) lightly ------------------------------------------------------------------------------------
class PILImages(torch.utils.data.Dataset):
    """The pre-training images as PIL images through a transform, as torchvision's datasets hand them out."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        image, label = self.images[i]
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return self.transform(pil), label


def lightly_view_kwargs(group: dict, views) -> dict:
    """lightly's view-transform arguments for one crop group of our views recipe (see ``docs/benchmarks.md`` for
    what differs: blur kernel, grayscale/saturation/hue on 1-channel images)."""
    return dict(input_size=group["size"], min_scale=group["scale"][0], hf_prob=group["flip_p"],
                vf_prob=group["vflip_p"], rr_prob=group["rot90_p"], cj_prob=group["jitter_p"], cj_strength=1.0,
                cj_bright=group["brightness"], cj_contrast=group["contrast"], cj_sat=group["saturation"],
                cj_hue=group["hue"], random_gray_scale=group["gray_p"], gaussian_blur=group["blur_p"],
                sigmas=group["blur_sigma"], normalize={"mean": views.mean.tolist(), "std": views.std.tolist()})


def lightly_recipe(method):
    """lightly's transform and loss for ``method`` and how a step runs them: ``"pair"`` (one network, both views)
    or ``"byol"`` (online predictor, momentum target); ``None`` where lightly has no equivalent."""
    from lightly import loss, transforms

    groups = [g for g in method.views.groups for _ in range(g["num"])]  # one entry per view
    first, second = (lightly_view_kwargs(g, method.views) for g in (groups + groups)[:2])
    name = type(method).__name__
    if name == "SimCLR":
        return transforms.SimCLRTransform(**first), loss.NTXentLoss(temperature=method.temperature), "pair"
    if name == "VICReg":
        w = method.weights
        return (transforms.VICRegTransform(**first, solarize_prob=groups[0]["solarize_p"]),
                loss.VICRegLoss(w["sim_weight"], w["var_weight"], w["cov_weight"]), "pair")
    if name in ("BYOL", "BarlowTwins"):  # lightly's Barlow Twins example uses BYOL's transform
        transform = transforms.BYOLTransform(
            transforms.BYOLView1Transform(**first, solarization_prob=groups[0]["solarize_p"]),
            transforms.BYOLView2Transform(**second, solarization_prob=groups[-1]["solarize_p"]))
        if name == "BYOL":
            return transform, loss.NegativeCosineSimilarity(), "byol"
        return transform, loss.BarlowTwinsLoss(lambda_param=method.lambd), "pair"
    return None


def lightly_loss(method, criterion, kind: str, x0: torch.Tensor, x1: torch.Tensor, step: int) -> torch.Tensor:
    """One step's loss the way lightly's examples write it: each view through the network on its own."""
    if kind == "pair":
        return criterion(method.projector(method.backbone(x0)), method.projector(method.backbone(x1)))
    from lightly.models.utils import update_momentum as lightly_momentum

    m = method.ema_momentum(step)
    lightly_momentum(method.backbone, method.backbone_t, m)
    lightly_momentum(method.projector, method.projector_t, m)
    p0, p1 = (method.predictor(method.projector(method.backbone(x))) for x in (x0, x1))
    with torch.no_grad():
        z0, z1 = (method.projector_t(method.backbone_t(x)) for x in (x0, x1))
    return 0.5 * (criterion(p0, z1) + criterion(p1, z0))


def batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def lightly_run(method, datamodule, s: Settings, device: torch.device, precision) -> tuple[float | None, str]:
    """Images/s of lightly's pipeline (end to end: waiting for the workers included) and a note; ``None`` and
    the reason where it cannot run."""
    try:
        recipe = lightly_recipe(method)
    except ImportError:
        return None, "lightly is not installed (pip install -e '.[bench]')"
    if recipe is None:
        return None, f"lightly has no {type(method).__name__}"
    transform, criterion, kind = recipe
    loader = torch.utils.data.DataLoader(PILImages(datamodule.pretrain, transform), batch_size=s.batch_size,
                                         shuffle=True, drop_last=True, num_workers=s.workers,
                                         persistent_workers=s.workers > 0)
    optimizer, _ = optimizer_of(method)
    it, timed = batches(loader), 0.0
    for step in range(s.warmup + s.steps):
        start = now(device)
        (x0, x1), _ = next(it)
        x0, x1 = x0.to(device), x1.to(device)
        with precision:
            loss = lightly_loss(method, criterion, kind, x0, x1, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= s.warmup:
            timed += now(device) - start
    return s.steps * s.batch_size / timed, f"{type(transform).__name__}, {type(criterion).__name__}"


# ---- one method ---------------------------------------------------------------------------------------
def benchmark_method(method_name: str, s: Settings) -> Row:
    """Every column for one method: ``s.rounds`` rounds of framework, bare, lightly; medians of the rounds."""
    cfg = bench_config(method_name, s)
    method, datamodule = build_method(cfg)
    device, precision = torch.device(s.device), autocast(cfg, torch.device(s.device))
    runs: dict[str, list] = {"framework": [], "bare": [], "lightly": [], "views": []}
    run_dir = Path(tempfile.mkdtemp(prefix="sslkit-bench-"))
    try:
        for _ in range(s.rounds):
            runs["framework"].append(framework_run(cfg, method, datamodule, s.warmup, run_dir, device))
            method.to(device).train()
            images = first_batch(datamodule, s.batch_size).to(device)
            runs["views"].append(views_seconds(method, images, s.steps))
            runs["bare"].append(bare_run(method, images, s, precision))
            runs["lightly"].append(lightly_run(method, datamodule, s, device, precision))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return summarise(method_name, runs, s.batch_size)


def summarise(method_name: str, runs: dict[str, list], batch_size: int) -> Row:
    """A :class:`Row` of the rounds' medians (end-to-end framework images/s from the monitor's figures)."""
    fw = runs["framework"]
    end_to_end = [r["train_images_per_s"] * (1 - r["data_wait_fraction"]) for r in fw]
    framework = statistics.median(end_to_end)
    lightly = [v for v, _ in runs["lightly"] if v is not None]
    return Row(method=method_name, framework=framework, bare=statistics.median(v for v, _ in runs["bare"]),
               lightly=statistics.median(lightly) if lightly else None,
               views_share=statistics.median(runs["views"]) * framework / batch_size,
               wait_share=statistics.median(r["data_wait_fraction"] for r in fw),
               peak_mib=max(r["peak_memory_mib"] for r in fw), bare_peak_mib=max(m for _, m in runs["bare"]),
               memory_kind=fw[0]["peak_memory_kind"], lightly_note=runs["lightly"][-1][1])


# ---- report -------------------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return NONE if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """The results as a markdown table."""
    lines = ["| method | framework (img/s) | bare (img/s) | lightly (img/s) | framework / bare | framework / lightly "
             "| making views | data wait | peak MiB (framework / bare) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r.method} | {r.framework:.1f} | {r.bare:.1f} | {_num(r.lightly, '.1f')} "
                     f"| {r.vs_bare:.2f} | {_num(r.vs_lightly, '.2f')} | {r.views_share:.1%} | {r.wait_share:.1%} "
                     f"| {r.peak_mib:.0f} / {r.bare_peak_mib:.0f} |")
    return "\n".join(lines)


def target_lines(rows: list[Row]) -> list[str]:
    """Whether each method meets the targets (framework >= 85% of bare, >= 1.5x lightly)."""
    lines = []
    for r in rows:
        bare = "met" if r.vs_bare >= TARGET_BARE else "NOT met"
        lines.append(f"- {r.method}: framework / bare = {r.vs_bare:.2f} (target >= {TARGET_BARE}): {bare}")
        if r.vs_lightly is None:
            lines.append(f"- {r.method}: framework / lightly: not measured ({r.lightly_note})")
        else:
            ok = "met" if r.vs_lightly >= TARGET_LIGHTLY else "NOT met"
            lines.append(f"- {r.method}: framework / lightly = {r.vs_lightly:.2f} (target >= {TARGET_LIGHTLY}): "
                         f"{ok} (lightly: {r.lightly_note})")
    return lines


def machine(device: str) -> str:
    """CPU model, cores, torch threads and GPU (if any), in words."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    where = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if device == "cuda":
        where += f", GPU {torch.cuda.get_device_name()}"
    return where


def section(rows: list[Row], s: Settings, command: str) -> str:
    """The markdown section ``--out`` writes: date, machine, torch, command, table and targets."""
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"`{command}` ({date}; {machine(s.device)}; torch {torch.__version__}; device {s.device}; "
            f"batch {s.batch_size}, {s.steps} timed steps after {s.warmup} warm-up steps, median of {s.rounds} "
            f"round(s); lightly with {s.workers} DataLoader workers; peak memory: "
            f"{'CUDA allocated' if s.device == 'cuda' else 'process peak RSS'})")
    return "\n".join([head, "", format_table(rows), "", *target_lines(rows)])


def _markers(device: str) -> tuple[str, str]:
    return f"<!-- src.bench.speed {device}: start -->", f"<!-- src.bench.speed {device}: end -->"


def write_section(path: Path, body: str, device: str) -> None:
    """Replace this device's generated section of ``path`` (between its markers), or append one."""
    start, end = _markers(device)
    title = f"## Speed: framework, bare PyTorch loop and lightly ({device.upper()})"
    block = f"{start}\n{title}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


# ---- command line -------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(prog="python -m src.bench.speed", description=__doc__.split("\n\n")[0])
    d = Settings()
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated, e.g. simclr,byol")
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--data", default=d.data)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--steps", type=int, default=d.steps, help="timed training steps of each column")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=d.rounds, help="measure every column this often, take medians")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads for all columns")
    p.add_argument("--workers", type=int, default=d.workers, help="lightly's DataLoader workers")
    p.add_argument("--out", type=Path, default=None, help="write the results section into this markdown file")
    p.add_argument("extra", nargs="*", help="more config overrides for every column, e.g. precision=bf16")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or a.rounds < 1 or a.batch_size < 2:
        p.error("--steps and --rounds must be >= 1, --warmup >= 0, --batch-size >= 2")
    s = Settings([m for m in a.methods.split(",") if m], a.backbone, a.data, a.batch_size, a.steps, a.warmup,
                 a.device, a.threads, a.workers, a.rounds, list(a.extra))
    return s, a.out


def run(s: Settings) -> list[Row]:
    """Measure every method of ``s`` with ``s.threads`` torch threads."""
    torch.set_num_threads(s.threads)
    return [benchmark_method(m, s) for m in s.methods]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s, out = parse(argv)
    rows = run(s)
    body = section(rows, s, shlex.join(["python", "-m", "src.bench.speed", *argv]))
    print("\n" + body, flush=True)
    if out is not None:
        write_section(out, body, s.device)
        print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
