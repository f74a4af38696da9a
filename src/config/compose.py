"""Config helpers shared by the CLI, the pre-flight check and the tests."""

from __future__ import annotations

import functools
import os
import statistics
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("lt"):
        OmegaConf.register_new_resolver("lt", lambda a, b: a < b)  # e.g. cifar_stem: ${lt:${data.crop_size},100}
    if not OmegaConf.has_resolver("scale_int"):  # e.g. a local crop 96/224 of the global one
        OmegaConf.register_new_resolver("scale_int", lambda a, f: max(1, round(a * f)))
    if not OmegaConf.has_resolver("round_to"):  # e.g. a local crop of whole ViT patches: ${round_to:96.3,16} = 96
        OmegaConf.register_new_resolver("round_to", lambda a, m: max(int(m), int(m) * round(a / m)))
    if not OmegaConf.has_resolver("vit_patch"):  # ViT patch size that follows the crop: 16 at 224 px, 8 at 96, 4 at 32
        OmegaConf.register_new_resolver("vit_patch", lambda crop: 16 if crop >= 160 else 8 if crop >= 64 else 4)
    if not OmegaConf.has_resolver("size_of_images"):  # data=imagefolder's image_size: ${size_of_images:root,train_dir}
        OmegaConf.register_new_resolver(
            "size_of_images", lambda root, sub: size_of_images(os.path.join(str(root), str(sub or ""))) if root else None)
    if not OmegaConf.has_resolver("hf_snapshot"):  # backbone=hf: the snapshot's mean, std, patch size (conf/backbone/hf.yaml)
        OmegaConf.register_new_resolver("hf_snapshot", _hf_snapshot)


def _hf_snapshot(name, key, channels=3):
    from src.backbones.hf import snapshot_value

    return snapshot_value(name, key, channels)


_register_resolvers()


def group_options(group: str) -> list[str]:
    """The choices of a config group, e.g. group_options('method') -> ['moco', 'moco_v1', ...]."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    """The run's config groups (conf/hydra/ holds Hydra's own: the SLURM launcher)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False):
    """Compose conf/train.yaml with overrides, outside a Hydra app (tests, pre-flight, benchmarks);
    ``return_hydra_config`` adds ``hydra.runtime.choices`` (which option of each group was taken)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def _first_images(folder: str, count: int, per_folder: int = 4) -> list[str]:
    """Up to ``count`` image files under ``folder``, at most ``per_folder`` from each folder, in sorted order; only the
    folders visited are listed (cheap on ImageNet)."""
    from src.data.datasets import IMAGE_EXTENSIONS

    found: list[str] = []
    for where, folders, files in os.walk(folder, followlinks=True):
        folders.sort()
        found += [os.path.join(where, f) for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS][:per_folder]
        if len(found) >= count:
            break
    return found[:count]


@functools.cache
def size_of_images(folder: str, count: int = 32) -> int | None:
    """The median shorter side of the first ``count`` images under ``folder`` (their headers, read with PIL): the
    image size of a folder dataset given none (conf/data/imagefolder.yaml). None where there is no readable image
    (the data checks then say what is missing). The choice is logged once per folder."""
    from lightning.pytorch.utilities import rank_zero_only
    from PIL import Image

    sides = []
    for path in _first_images(folder, count):
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - a bad file is the dataset's to skip and count, not the size's
            continue
    if not sides:
        return None
    size = int(statistics.median_low(sides))
    # stdout: a run that stops on a config problem still has exactly one line on stderr, its error
    rank_zero_only(print)(f"data.image_size={size}: the median shorter side of {len(sides)} images under {folder}; "
                          "set data.image_size=<pixels> to choose another size", flush=True)
    return size


def fitted(cfg, choices) -> list[str]:
    """The lines a run logs when conf/fit/ changed its config (``choices``: Hydra's ``runtime.choices``):
    fit/method/<method>_<hardware>.yaml (e.g. "CPU-sized") and fit/data/<backbone>_<data>.yaml, each value they set
    that the command line did not set otherwise, beside the group's own value."""
    lines = []
    for kind in ("method", "data"):
        name = choices.get(f"fit/{kind}@_global_") or choices.get(f"fit/{kind}")
        path = CONF_DIR / "fit" / kind / f"{name}.yaml"
        if not name or not path.is_file():
            continue
        fit = OmegaConf.load(path)
        changed = [f"{top}.{key} {value} instead of {_own_values(top, choices.get(top)).get(key)}"
                   for top in ("method", "views", "data", "backbone", "trainer")
                   for key, value in (fit.get(top) or {}).items() if OmegaConf.select(cfg, f"{top}.{key}") == value]
        if changed:
            label = f"{str(choices.hardware).upper()}-sized" if kind == "method" else f"fitted to data={choices.data}"
            keep = ("hardware=gpu, a recipe (experiment=...) or <key>=... on the command line keeps the paper's" if kind == "method"
                    else "<key>=... on the command line wins")
            lines.append(f"{label} ({path.relative_to(CONF_DIR.parent)}): {', '.join(changed)}; {keep}")
    return lines


def _own_values(group: str, name: str | None) -> dict:
    """The values of conf/<group>/<name>.yaml itself, with those of the options of the same group its defaults list
    names (``method=moco`` is moco_v2's) underneath; for a key of conf/train.yaml that is no group (``trainer``),
    its values there. Read from the files (composing here would reset a running Hydra app)."""
    if name is None:
        return dict(OmegaConf.load(CONF_DIR / "train.yaml").get(group) or {})
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    values: dict = {}
    for entry in node.get("defaults") or []:
        if isinstance(entry, str) and entry != "_self_" and (CONF_DIR / group / f"{entry}.yaml").is_file():
            values.update(_own_values(group, entry))
    values.update({k: v for k, v in node.items_ex(resolve=False) if k != "defaults"})
    return values
