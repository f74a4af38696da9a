"""Checkpoints that are never half-written, and finding the run a `resume=auto` start continues.

:class:`AtomicCheckpointIO` writes to a temporary file in the checkpoint's folder, flushes it to disk and
renames it over the target (``os.replace`` is atomic on POSIX), so a kill during saving leaves the
previous ``last.ckpt`` intact. Loading is safe by default (``weights_only=True``): a checkpoint holds
tensors and plain Python values only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

# keys that may differ between a run and its continuation
RESUME_KEYS = ("resume", "ckpt_path")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and ``weights_only=True`` loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options}")
        if "://" in str(path):  # remote filesystems: fsspec's transaction, as Lightning does
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=True if weights_only is None else weights_only)


def _comparable(cfg: DictConfig) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in (*RESUME_KEYS, "hydra"):
        plain.pop(key, None)
    return plain


def resumable_runs(cfg: DictConfig, search: Path) -> list[Path]:
    """Run folders under ``search`` (or ``search`` itself) that hold ``checkpoints/last.ckpt`` and were started
    with the same config as ``cfg`` (ignoring ``resume``/``ckpt_path``), newest checkpoint first."""
    want = _comparable(cfg)
    found = []
    configs = [search / ".hydra" / "config.yaml"] if (search / ".hydra").is_dir() else search.glob("**/.hydra/config.yaml")
    for config in configs:
        run = config.parent.parent
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            continue
        try:
            same = _comparable(OmegaConf.load(config)) == want
        except Exception:  # noqa: BLE001 - an unreadable config is not a run we continue
            same = False
        if same:
            found.append(run)
    return sorted(found, key=lambda r: (r / "checkpoints" / "last.ckpt").stat().st_mtime, reverse=True)


def finished(run: Path) -> bool:
    """Whether the run folder's results.json is newer than its last.ckpt: the run ended after its last checkpoint,
    so ``resume=auto`` has nothing left to do."""
    results, ckpt = run / "results.json", run / "checkpoints" / "last.ckpt"
    return results.is_file() and ckpt.is_file() and results.stat().st_mtime >= ckpt.stat().st_mtime


def model_from_checkpoint(state: dict) -> Any:
    """The method of a checkpoint ``state`` (read with ``weights_only=True``), rebuilt from the run config saved
    in it (``state["config"]``) and loaded with its weights, in eval mode."""
    from hydra.utils import instantiate

    cfg = state["config"]
    backbone_cfg = {k: v for k, v in cfg["backbone"].items() if k != "pretrained"}  # its weights are in the file
    model = instantiate(cfg["method"], backbone=instantiate(backbone_cfg), views=instantiate(cfg["views"]))
    model.load_state_dict(state["state_dict"])
    return model.eval()
