"""The command line before Hydra runs anything.

:func:`preflight`: unknown choices, unknown keys, bad values and missing data become one line each on stderr and exit
code 2, before any run folder is written; sweeps (``-m method=simclr,moco``) are expanded and every combination is
checked. :func:`launch_arguments`: what ``resume=auto`` and multi-node runs add to the command line. Hydra's own
flags (``--cfg``, ``--info``, ``--help``, ``--config-name``...) are Hydra's business: neither touches them.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import shutil
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from src.config.compose import compose, config_groups, group_options
from src.config.keys import walk_leaves
from src.config.rules import config_problems, objective_problems
from src.utils.checkpointing import finished, resumable_runs
from src.utils.errors import UserError, fail

MAX_COMBINATIONS = 256

# Hydra plugins that ship as optional extras: (argument prefix, plugin module, extra, what it is)
PLUGINS = [
    ("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "sweep", "Hydra's Optuna sweeper"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "sweep", "Hydra's Optuna sweeper"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm", "Hydra's submitit launcher"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm", "Hydra's submitit launcher"),
]


def plugin_problems(argv: list[str]) -> list[str]:
    """A sweeper or launcher whose optional extra is not installed: one line saying what to install."""
    import importlib.util

    problems, named = [], set()
    for prefix, module, extra, what in PLUGINS:
        given = next((a for a in argv if a.startswith(prefix) and not a.endswith("=null")), None)
        if given and module not in named and importlib.util.find_spec(module) is None:
            named.add(module)  # one line per missing extra
            problems.append(f"{given} needs {what}, an optional extra: pip install -e '.[{extra}]'")
    return problems


def search_space_problems(overrides: list[str]) -> list[str]:
    """Every key an Optuna search space (``hparams_search=...``) samples must exist in the composed run config."""
    if not any(o.startswith("hparams_search=") and not o.endswith("=null") for o in overrides):
        return []
    cfg = compose(overrides, return_hydra_config=True)
    if objective := objective_problems(cfg, searching=True):
        return objective
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    search = cfg.hydra.runtime.choices.get("hparams_search")
    method = cfg.hydra.runtime.choices.get("method")
    missing = object()
    return [f"hparams_search={search} samples {key}, which method={method} does not have; choose another search "
            f"space (conf/hparams_search/) or set hydra.sweeper.params" for key in params
            if OmegaConf.select(cfg, str(key), default=missing) is missing]


def _leaf_keys(cfg: DictConfig) -> list[str]:
    keys = []
    for top in cfg.keys():
        if top != "hydra" and isinstance(cfg[top], DictConfig):
            keys += [k for k, _ in walk_leaves(cfg[top], str(top))]
            keys += [f"{top}.{k}" for k in cfg[top].keys()]
        else:
            keys.append(str(top))
    return keys


def _expand(overrides: list[str]) -> list[list[str]]:
    """Expand sweep overrides into concrete override lists (one per job)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_COMBINATIONS)]


def _composition_message(err: Exception, overrides: list[str]) -> str:
    text = f"{err}\n{err.__cause__ or ''}"
    m = re.search(r"Could not override '([^']+)'", text)
    if m and ("not in struct" in text or "No match in" in text):
        key = m.group(1)
        try:
            base = compose([o for o in overrides if not o.lstrip("+~").startswith(key + "=")])
            close = difflib.get_close_matches(key, _leaf_keys(base), n=1, cutoff=0.75)
        except Exception:  # noqa: BLE001 - another override is bad too; report this one plainly
            close = []
        hint = f"; did you mean '{close[0]}'?" if close else f"; use +{key}=... to add a new key"
        return f"unknown config key '{key}'{hint}"
    m = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if m:
        group, name = m.groups()
        return f"unknown {group} '{name}'; available: {', '.join(group_options(group))}"
    return text.strip().splitlines()[0]


def launcher_problems(cfg: DictConfig, launcher: str | None) -> list[str]:
    """hydra/launcher=slurm asks SLURM for trainer.num_nodes nodes of trainer.devices tasks and GPUs each."""
    if launcher != "slurm":
        return []
    devices, nodes = cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int) or nodes < 1:
        return [f"hydra/launcher=slurm asks SLURM for trainer.num_nodes={nodes} node(s) of trainer.devices={devices} "
                "GPU(s) and tasks each; give both as numbers (e.g. trainer.devices=8 trainer.num_nodes=2)"]
    return []


def unsized_problems(cfg: DictConfig) -> list[str]:
    """``data.image_size`` null: a folder dataset takes it from its images (conf/data/imagefolder.yaml), so with none to
    read what is wrong with the folder (data.root missing, empty...) comes first; other datasets refuse it."""
    from hydra.utils import instantiate

    if cfg.data.get("image_size") is not None:
        return []
    OmegaConf.resolve(cfg.data)
    instantiate(cfg.data).check_root()  # raises the dataset's own problem
    return [f"data.image_size is not set and no image under {cfg.data.root}/{cfg.data.get('train_dir') or ''} could be "
            "read to take it from; set data.image_size=<pixels>"]


def problems_for(overrides: list[str], launcher: str | None = None) -> list[str]:
    groups = set(config_groups())
    for o in overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key in groups and value not in group_options(key) and "," not in value:
            return [f"unknown {key} '{value}'; available: {', '.join(group_options(key))}"]
    try:
        cfg = compose(overrides)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types for bad overrides
        return [_composition_message(e, overrides)]
    try:
        if unsized := unsized_problems(cfg):
            return unsized
        problems = (config_problems(cfg, local_devices=launcher != "slurm") + search_space_problems(overrides)
                    + launcher_problems(cfg, launcher))
        if not problems:
            from hydra.utils import instantiate

            OmegaConf.resolve(cfg.data)
            instantiate(cfg.data).check_root()
    except UserError as e:
        problems = str(e).splitlines()
    except Exception as e:  # noqa: BLE001
        if isinstance(e.__cause__, UserError):  # a constructor's refusal, wrapped by Hydra's instantiate
            return str(e.__cause__).splitlines()
        problems = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    return problems


def command_problems(argv: list[str]) -> list[str]:
    """One line per reason the ``src.train`` command line cannot run (every job of a sweep checked); none: it can."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return []  # --help, --cfg, --info ...: Hydra's own business
    if missing := plugin_problems(argv):
        return missing
    if "hydra/launcher=slurm" in argv and shutil.which("srun") is None:
        return ["hydra/launcher=slurm submits SLURM jobs, but this machine has no SLURM (no srun); run the command on "
                "the cluster's login node, or try the sweep here with hydra/launcher=submitit_local"]
    overrides = [a for a in argv if not a.startswith("-") and not a.startswith(("hydra.", "hydra/"))]
    try:
        combos = _expand(overrides)
    except Exception as e:  # noqa: BLE001
        return [f"cannot parse the command line: {str(e).strip().splitlines()[0]}"]
    launcher = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra/launcher=")), None)
    return list(dict.fromkeys(p for combo in combos for p in problems_for(combo, launcher)))  # in order, once each


def preflight(argv: list[str]) -> None:
    """Exit with code 2 and one line per problem when the command line cannot run."""
    if problems := command_problems(argv):
        fail(problems)


def launch_arguments(argv: list[str]) -> list[str]:
    """The command line ``src.train`` hands to Hydra: ``argv`` with the run folder (and checkpoint) that ``resume=auto``
    continues, or the shared run folder of a multi-node run, added. A command line with any of Hydra's own flags
    (``--cfg``, ``-c``, ``--package``, ``--config-name``, ``-cp``, ``--info``, ``--help``, ``-m``...) goes to Hydra as it
    is: those print or sweep, and a flag's value is not an override."""
    if any(a.startswith("-") for a in argv):
        return argv
    return multinode_arguments(resume_arguments(argv))


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def resume_arguments(argv: list[str]) -> list[str]:
    """``resume=auto``: the run folder and ``last.ckpt`` of the newest run of the same config (searched in
    ``hydra.run.dir`` when given, else under ``outputs/``) are added to ``argv``; none found: a fresh run."""
    if not any(a.startswith("resume=") for a in argv) or any(a.startswith("hparams_search=") for a in argv):
        return argv  # in a sweep each job continues from its own folder (a requeued SLURM job): continue_job
    cfg = compose([a for a in argv if not a.startswith(("hydra.", "hydra/"))])
    if cfg.get("resume") != "auto":
        return argv
    given = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("hydra.run.dir=")]
    search = Path(given[-1]) if given else Path("outputs")
    runs = resumable_runs(cfg, search) if search.exists() else []
    say = print if os.environ.get("LOCAL_RANK", "0") == "0" else (lambda *a, **k: None)  # DDP re-launches us
    if not runs:
        say(f"resume=auto: no run of this config with a checkpoint under {search}; starting a new run", flush=True)
        return argv
    run = runs[0]
    results, ckpt = run / "results.json", run / "checkpoints" / "last.ckpt"
    if finished(run):
        say(f"resume=auto: {run} already finished; its results are in {results}", flush=True)
        sys.exit(0)
    say(f"resume=auto: continuing {run} from {ckpt}", flush=True)
    kept = [a for a in argv if not a.startswith(("hydra.run.dir=", "ckpt_path="))]
    return [*kept, f"hydra.run.dir={_quote(str(run))}", f"ckpt_path={_quote(str(ckpt))}"]


def multinode_arguments(argv: list[str]) -> list[str]:
    """Every node of a multi-node run must write into one run folder: under SLURM (srun without the launcher)
    ``outputs/<method>_<backbone>_<data>/slurm_<job id>`` is added; elsewhere the user passes the same
    ``hydra.run.dir`` on every node. Sweeps get one folder per job from Hydra's launcher."""
    if any(a.startswith(("hydra.run.dir=", "hparams_search=")) for a in argv):
        return argv
    # only a hardware choice, a recipe or trainer.num_nodes can ask for several nodes (the default is one):
    # other launches skip composing the config again (0.1 s of every start, and of every DDP child's)
    if not any("num_nodes" in a or a.startswith(("hardware=", "experiment=")) for a in argv):
        return argv
    cfg = compose([a for a in argv if not a.startswith(("hydra.", "hydra/"))], return_hydra_config=True)
    nodes = cfg.trainer.get("num_nodes", 1)
    if not isinstance(nodes, int) or nodes <= 1:
        return argv
    if job := os.environ.get("SLURM_JOB_ID"):
        choices = cfg.hydra.runtime.choices
        return [*argv, f"hydra.run.dir=outputs/{choices.method}_{choices.backbone}_{choices.data}/slurm_{job}"]
    fail([f"trainer.num_nodes={nodes}: every node must write into the same run folder; pass the same "
          "hydra.run.dir=... on every node (under SLURM the job id names it)"])
    return argv
