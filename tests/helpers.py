import atexit
import copy
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from src.config.compose import compose, group_options

ROOT = Path(__file__).resolve().parents[1]
METHODS = group_options("method")

torch.set_num_threads(2)


TINY_CONVNET = ("backbone=convnet", "backbone.width=8", "backbone.depth=2")
TINY_VIT = ("backbone=vit_cpu", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2")


def method_class(name: str):
    from hydra.utils import get_class

    return get_class(_composed((f"method={name}",)).method._target_)


def tiny_cfg(method: str, *overrides: str, vit: bool | None = None):
    """The real configs of ``method`` shrunk to run in a second on CPU: fake 16 px data and an 8-channel convnet,
    or (``vit``, the default for methods that need ViT tokens) a 32-wide ViT of 2 blocks on 4 px patches. BEiT
    gets the tiny tokenizer of :func:`tiny_tokenizer`; CLIP class-prompt captions and a 1-block text tower."""
    vit = getattr(method_class(method), "needs_tokens", False) if vit is None else vit
    extra = [f"method.tokenizer={tiny_tokenizer()}"] if method == "beit" and "method.tokenizer" not in overrides_keys(
        overrides, full=True) else []
    if getattr(method_class(method), "needs_captions", False):  # CLIP: class-prompt captions, a 1-block text tower
        extra += [o for o in ("data.captions=class_prompts", "method.context_length=16", "method.text_width=32",
                              "method.text_heads=2", "method.text_layers=1")
                  if o.split("=")[0] not in overrides_keys(overrides, full=True)]
    cfg = composed(f"method={method}", "data=fake", *(TINY_VIT if vit else TINY_CONVNET), "data.batch_size=16",
                   "data.image_size=16", "data.crop_size=16", "logger=none", "eval=none", "trainer.max_epochs=1",
                   *extra, *overrides)
    with open_dict(cfg):
        for key in cfg.method:  # heads of 32 units (DINO's 8192-wide, 65536-way ones included)
            if key.endswith("_dim") and key not in overrides_keys(overrides):
                cfg.method[key] = 32
        if "num_prototypes" in cfg.method:
            cfg.method.num_prototypes = 16
        if cfg.method.get("queue_size"):
            cfg.method.queue_size = 64
        if "decoder_depth" in cfg.method:  # MAE's decoder: 1 block of 2 heads
            cfg.method.decoder_depth, cfg.method.decoder_heads = 1, 2
        if "num_codes" in cfg.method and "num_codes" not in overrides_keys(overrides):
            cfg.method.num_codes = 64
        cfg.method.warmup_epochs = 0
        if "gap" in cfg.method and "gap" not in overrides_keys(overrides):
            cfg.method.gap, cfg.method.jitter = 1, 0  # a 3x3 grid of 4-px patches fits the 16-px crop
    return cfg


def composed(*overrides: str):
    """``compose(overrides)``, composed once per test process (a Hydra composition takes 0.6-0.8 s here): a fresh copy
    each call, since tests change the config they get."""
    return copy.deepcopy(_composed(overrides))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return compose(list(overrides))


@functools.cache
def tiny_tokenizer() -> str:
    """A tokenizer checkpoint for tiny BEiT configs (VQ-VAE on a convnet of stride 4 = the tiny ViT's patch),
    trained for 2 steps once per test session into a temporary folder."""
    import lightning as L
    from hydra.utils import instantiate

    folder = Path(tempfile.mkdtemp(prefix="sslkit-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    cfg = tiny_cfg("vqvae", "backbone.depth=3")
    L.seed_everything(0)
    method = instantiate(cfg.method, backbone=instantiate(cfg.backbone), views=instantiate(cfg.views))
    method.run_config = {k: to_plain(cfg[k]) for k in ("backbone", "views", "method", "data")}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=instantiate(cfg.data))
    trainer.save_checkpoint(folder / "tokenizer.ckpt")
    return str(folder / "tokenizer.ckpt")


def overrides_keys(overrides, full: bool = False) -> set[str]:
    keys = {o.split("=", 1)[0] for o in overrides}
    return keys if full else {k.removeprefix("method.") for k in keys}


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m src.train ARGS` as a user would (see :func:`run_module`)."""
    return run_module("src.train", *args, cwd=cwd, timeout=timeout, env=env)


def run_module(module: str, *args: str, cwd: Path = ROOT, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` as a user would: a process of its own, forked from :func:`cli_server`, which has
    paid the imports once (a DDP run's other processes are `python -m MODULE ARGS`, started by Lightning). ``env``:
    the whole environment (default: this one, with warnings off and W&B offline)."""
    env = env or {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    server = cli_server()
    with tempfile.TemporaryDirectory(prefix="sslkit-cli-") as folder:
        out, err = f"{folder}/stdout", f"{folder}/stderr"
        request = {"module": module, "args": list(args), "cwd": str(cwd), "env": env, "stdout": out, "stderr": err}
        server.stdin.write((json.dumps(request) + "\n").encode())
        server.stdin.flush()
        pid = json.loads(_reply(server, timeout))["pid"]
        try:
            code = json.loads(_reply(server, timeout))["rc"]
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            _reply(server, 60)
            raise
        return subprocess.CompletedProcess([module, *args], code, Path(out).read_text(errors="replace"),
                                           Path(err).read_text(errors="replace"))


def _reply(server: subprocess.Popen, timeout: float) -> str:
    """The server's next line, read byte by byte from its pipe (nothing is left in a buffer that select cannot see)."""
    line, fd = b"", server.stdout.fileno()
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(["tests/cli_server.py"], timeout)
        byte = os.read(fd, 1)
        if not byte:
            raise RuntimeError("tests/cli_server.py ended")
        line += byte
    return line.decode()


@functools.cache
def cli_server() -> subprocess.Popen:
    """tests/cli_server.py, started once per test process."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_server.py")], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)
    atexit.register(server.kill)
    return server


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_results(worker, out: Path, *args) -> list:
    """``worker(rank, 2, port, out, *args)`` in two processes over gloo (each saves ``out/rank<r>.pt``): what they saved."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, free_port(), str(out), *args), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def averaged_over_ranks(steps: list) -> list:
    """[(loss, {name: grad})] of this process -> the same averaged over every process, as DDP's all-reduce gives."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for loss, grads in steps:
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
    return [(loss / world, {k: g / world for k, g in grads.items()}) for loss, grads in steps]


def to_plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)
