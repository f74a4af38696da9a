"""Checkpoints that are never half-written, and finding the run a `resume=auto` start continues.

:class:`AtomicCheckpointIO` writes to a temporary file in the checkpoint's folder, flushes it to disk and
renames it over the target (``os.replace`` is atomic on POSIX), so a kill during saving leaves the
previous ``last.ckpt`` intact. Loading is safe by default (``weights_only=True``): a checkpoint holds
tensors and plain Python values only.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from src.utils.errors import UserError

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


def build_method(config: Any, fresh: bool = False, **kwargs) -> Any:
    """The method of a run config (the composed config, or the plain dict a checkpoint keeps) with its backbone and
    views injected (``kwargs`` go to the method). ``fresh=True``: the same architecture without the weights file of
    ``backbone.pretrained`` (the random-init baseline, and a checkpoint's model before its own weights are loaded)."""
    from hydra.utils import instantiate

    backbone = build_backbone(config["backbone"], fresh)
    return instantiate(config["method"], backbone=backbone, views=instantiate(config["views"]), **kwargs)


def build_backbone(config: Any, fresh: bool = False) -> Any:
    """The backbone of ``config`` (a ``backbone`` node); ``fresh=True``: without its ``pretrained`` weights file."""
    from hydra.utils import instantiate

    if fresh and "pretrained" in config:
        plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
        config = {k: v for k, v in plain.items() if k != "pretrained"}
    return instantiate(config)


def model_from_checkpoint(state: dict) -> Any:
    """The method of a checkpoint ``state`` (read with ``weights_only=True``), rebuilt from the run config saved
    in it (``state["config"]``) and loaded with its weights, in eval mode."""
    model = build_method(state["config"], fresh=True)
    model.load_state_dict(state["state_dict"])
    return model.eval()


def load_checkpoint(path: Path) -> dict:
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a readable checkpoint (not a torch.save archive); pass a last.ckpt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read when used
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" such as {found.group(1)}" if found else ""
        raise UserError(f"{path} holds Python objects{what} besides tensors and plain values, so it is not loaded "
                        "(safe loading, weights_only=True); only checkpoints of this framework are read") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100]})") from e
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise UserError(f"{path} is not a checkpoint of this framework (no state_dict); pass a last.ckpt")
    return state


def load_run_model(ckpt: Path, purpose: str) -> tuple[dict, Any]:
    """``(state, model)`` of a checkpoint that carries its run config (every checkpoint of this framework since the
    config was saved in it), the model rebuilt from that config with its weights, in eval mode; ``purpose`` (e.g.
    "search needs a CLIP checkpoint") ends the one-line error for a missing file or config."""
    if not ckpt.is_file():
        raise UserError(f"{ckpt} is not a file; pass a checkpoint such as outputs/<run>/checkpoints/last.ckpt "
                        f"({purpose})")
    state = load_checkpoint(ckpt)
    config = state.get("config")
    if not isinstance(config, dict) or not {"method", "backbone", "views", "data"} <= config.keys():
        raise UserError(f"{ckpt} has no run config in it (written by older versions); {purpose}")
    return state, model_from_checkpoint(state)


def weight_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], prefix: str) -> str | None:
    """A description of how ``found`` differs from ``expected`` under ``prefix`` (None when they match)."""
    want = {k: tuple(v.shape) for k, v in expected.items() if k.startswith(prefix)}
    got = {k: tuple(v.shape) for k, v in found.items() if k.startswith(prefix)}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    shapes = [f"{k} {got[k]} instead of {want[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if not (missing or extra or shapes):
        return None
    parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
    parts += [f"{len(shapes)} of another shape (e.g. {shapes[0]})"] if shapes else []
    return ", ".join(parts)


def epochs_trained(state: dict) -> int | None:
    """Training epochs whose steps all ran before ``state`` was saved (the fit loop's processed epochs; the
    checkpoint's own ``epoch`` is the 0-based index of the epoch it was saved in)."""
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return state.get("epoch")


def run_choice(ckpt: Path, group: str) -> str | None:
    """Which option of ``group`` the checkpoint's run used (from its run folder's .hydra/hydra.yaml), if known."""
    hydra_yaml = Path(ckpt).resolve().parent.parent / ".hydra" / "hydra.yaml"
    try:
        return str(OmegaConf.load(hydra_yaml).hydra.runtime.choices[group])
    except Exception:  # noqa: BLE001 - no run folder, or an older layout
        return None


def weights_problem(model: Any, state: dict, ckpt: Path) -> str | None:
    """One line when a checkpoint's weights do not fit ``model`` (a method built from the config): the backbone first
    (naming the backbone its run used, when its run folder says), then the rest of the method; None when they fit."""
    expected, found = model.state_dict(), state["state_dict"]
    if problem := weight_mismatch(expected, found, "backbone."):
        name = type(model.backbone).__name__
        trained = run_choice(ckpt, "backbone")
        hint = f"its run used backbone={trained}; pass that" if trained else "pass the backbone it was trained with"
        return (f"{ckpt} does not hold a {name} backbone of this configuration: its backbone weights are "
                f"{problem}; {hint} (and the run's backbone.* settings)")
    if problem := weight_mismatch(expected, found, ""):
        return (f"{ckpt} does not match method {type(model).__name__} as configured: {problem}; pass the "
                "method= and method.* settings of its run")
    return None


def resume_problem(model: Any, ckpt: str | Path) -> str | None:
    """``ckpt_path=<file>``: one line when the file is not a checkpoint of this framework, holds objects, or holds
    weights of another method or backbone than ``model``'s (checked before Lightning reads it); None when it fits."""
    try:
        problem = weights_problem(model, load_checkpoint(Path(ckpt)), Path(ckpt))
    except UserError as e:
        problem = str(e)
    return f"ckpt_path={problem}" if problem else None


def load_weights(model: Any, state: dict, ckpt: Path) -> None:
    """Load a checkpoint's weights into ``model``, or raise :func:`weights_problem`'s line."""
    if problem := weights_problem(model, state, ckpt):
        raise UserError(problem)
    model.load_state_dict(state["state_dict"], strict=True)
