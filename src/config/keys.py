"""Config keys and value types checked against the code that receives them, before anything is built.

Every config node with a ``_target_`` (method, method.optimizer, backbone, data, views, each eval callback,
each logger) is compared with the target's constructor signature: a key that is not a parameter is
refused with the closest valid key, and a value whose type does not fit the parameter's annotation
(int, float, bool, str, ``X | None``, list/tuple, Literal) is refused naming key, value and expected type.
``trainer.*`` is checked against ``lightning.Trainer``, the crop groups of ``views.crops`` against the
keys the views understand, ``checkpoint.*`` and the top-level keys against ``conf/train.yaml``.

Constructors that take ``**kwargs`` are followed up their base classes (``SimCLR(**kwargs)`` ->
``SSLMethod.__init__``); W&B's logger passes its ``**kwargs`` to ``wandb.init``. Values that cannot be
resolved outside a run (``${hydra:...}``, ``${now:...}``, a broken interpolation) are skipped here.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import os
import types
import typing
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from src.config.compose import CONF_DIR, config_groups

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}

# Keys the framework reads itself (they never reach the constructor): node path pattern -> {key: type}.
FRAMEWORK_KEYS: dict[str, dict[str, Any]] = {
    "eval.*": {"random_baseline": bool},  # src/train.py: a fresh method measured as the random-init baseline
    "logger.wandb": {"mode": Literal["auto", "online", "offline", "disabled"], "init_timeout": float},
}
# Parameters the framework passes itself: a config value would be silently replaced.
INJECTED: dict[str, dict[str, str]] = {
    "method": {"backbone": "choose it with backbone=...", "views": "choose it with views=...",
               "nonfinite_loss": "set the top-level nonfinite_loss=stop|skip"},
    "method.optimizer": {"params": "the method passes its parameter groups"},
    "eval.*": {"random_backbone": "set eval.<name>.random_baseline=true|false instead",
               "seed": "it follows the top-level seed"},
    "logger.*": {"save_dir": "loggers write into the run folder"},
    "logger.wandb": {"name": "the run is named after method, backbone and data",
                     "settings": "set logger.wandb.init_timeout, or other W&B settings as WANDB_* variables",
                     "id": "each run folder keeps its own W&B run id (<run>/.wandb_id), so resume=auto continues it",
                     "resume": "resume=auto continues the run folder and its W&B run"},
    "trainer": {"callbacks": "callbacks come from the eval group", "logger": "use logger=...",
                "default_root_dir": "the run folder is hydra.run.dir"},
}
# Constructors whose **kwargs go on to another callable.
KWARGS_FORWARDED_TO = {"lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init"}
TOP_LEVEL_TYPES = {"seed": int, "ckpt_path": str | None, "resume": Literal["auto"] | None,
                   "nonfinite_loss": Literal["stop", "skip"], "objective": str}


@dataclass(frozen=True)
class Problem:
    key: str  # dotted key, e.g. "method.temperature"
    text: str  # the line shown to the user (without "error: ")
    kind: str  # "unknown" (a key the code does not take) or "type" (a value of the wrong type)


_UNRESOLVED = object()


def _is_runtime_interpolation(raw: Any) -> bool:
    return isinstance(raw, str) and ("${hydra:" in raw or "${now:" in raw)


def _is_reference(raw: Any) -> bool:
    """A plain reference to another key (``${data.crop_size}``), not a resolver call (``${lt:...}``)."""
    return isinstance(raw, str) and raw.startswith("${") and raw.endswith("}") and ":" not in raw \
        and raw.count("${") == 1


def _value(node: DictConfig | ListConfig, key: Any) -> Any:
    """The resolved plain value of ``node[key]``, or _UNRESOLVED when it cannot be resolved here."""
    try:
        raw = node._get_node(key)._value()
        if _is_runtime_interpolation(raw):
            return _UNRESOLVED
        value = node[key]
        if isinstance(value, DictConfig | ListConfig):
            if any(_is_runtime_interpolation(v) for _, v in walk_leaves(value)):
                return _UNRESOLVED
            return OmegaConf.to_container(value, resolve=True)
        return value
    except Exception:  # noqa: BLE001 - a broken interpolation is reported when it is used
        return _UNRESOLVED


def walk_leaves(node: DictConfig | ListConfig, prefix: str = ""):
    """(dotted key, raw value) of every leaf under ``node``, interpolations left unresolved (the one tree walker of
    the config checks)."""
    items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node._iter_ex(resolve=False))
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, DictConfig | ListConfig):
            yield from walk_leaves(v, key)
        else:
            yield key, v


# ---- types ------------------------------------------------------------------------------------------
def _matches(value: Any, t: Any) -> bool | None:
    """Whether a plain config value fits annotation ``t``; None when the annotation says nothing checkable."""
    if t is inspect.Parameter.empty or t is Any or isinstance(t, str | typing.TypeVar):
        return None
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in args]
        if any(r is True for r in results):
            return True
        if any(r is None for r in results):  # e.g. str | Accelerator: a plain scalar must be the str
            return None if not _scalar(value) else False
        return False
    if t is type(None) or t is None:
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if t in (list, tuple) or origin in (list, tuple) or _is_sequence(origin):
        if not isinstance(value, list | tuple):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            pairs = zip(value, args, strict=True) if len(value) == len(args) else None
            return pairs is not None and all(_matches(v, a) is not False for v, a in pairs)
        return all(_matches(v, args[0]) is not False for v in value)
    if t is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(t, type) and issubclass(t, os.PathLike):
        return isinstance(value, str) or None
    return None  # a class the config can only give through _target_ (a module, an Accelerator, a callable)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _is_sequence(origin: Any) -> bool:
    import collections.abc as abc

    return origin in (abc.Sequence, abc.MutableSequence, typing.Sequence)


def describe(t: Any) -> str:
    """A short human name for an annotation: ``int | None`` -> 'an integer or null'."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is Literal]
        members = [a for a in args if typing.get_origin(a) is not Literal and a is not type(None)]
        if int in members and float in members:
            members.remove(int)  # "a number" covers both
        parts = [describe(a) for a in members]
        if literals:
            parts.insert(0, "one of " + ", ".join(_show(v) for a in literals for v in typing.get_args(a)))
        if type(None) in args:
            parts.append("null")
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if t in PRIMITIVE_NAMES:
        return PRIMITIVE_NAMES[t]
    if origin in (list, tuple) or _is_sequence(origin):
        if args and origin is tuple and args[-1] is not Ellipsis and len(set(args)) == 1:
            return f"a list of {len(args)} {PLURALS.get(args[0], describe(args[0]) + ' items')}"
        if args and (origin is not tuple or args[-1] is Ellipsis):
            return f"a list of {PLURALS.get(args[0], describe(args[0]) + ' items')}"
        return "a list"
    if t in (list, tuple):
        return "a list"
    if t is dict or origin is dict:
        return "a mapping"
    return getattr(t, "__name__", str(t))


PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
PRIMITIVE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _type_name(value: Any) -> str:
    return {bool: "a bool", int: "an integer", float: "a float", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def type_problem(key: str, value: Any, t: Any) -> Problem | None:
    if value is _UNRESOLVED or _matches(value, t) is not False:
        return None
    got = "" if isinstance(value, list | tuple | dict) else f", got {_type_name(value)}"
    return Problem(key, f"{key}={_show(value)}: expected {describe(t)}{got}", "type")


def _typed(node: DictConfig, key: Any, dotted: str, t: Any) -> Problem | None:
    """The type problem of ``node[key]``; none for a plain reference such as ``${data.crop_size}`` (its type
    is checked where it is set)."""
    if _is_reference(node._get_node(key)._value()):
        return None
    return type_problem(dotted, _value(node, key), t)


# ---- signatures -------------------------------------------------------------------------------------
@cache
def accepted_parameters(target: str) -> tuple[dict[str, Any], bool, str]:
    """(parameter -> annotation, open, owner name) of what ``target`` accepts as keyword arguments; ``open``
    when it takes ``**kwargs`` that lead nowhere checkable. Raises when the target cannot be imported."""
    from hydra.utils import _locate

    obj = _locate(target)
    owner = getattr(obj, "__name__", target)
    params: dict[str, Any] = {}
    if inspect.isclass(obj):
        functions = [k.__dict__["__init__"] for k in obj.__mro__ if "__init__" in k.__dict__ and k is not object]
    else:
        functions = [obj]
    has_var_kw = True
    for fn in functions:
        sig = _signature(fn)
        if sig is None:
            return params, True, owner
        for i, p in enumerate(sig.parameters.values()):
            if (i == 0 and inspect.isclass(obj) and p.name == "self") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.kind is not p.POSITIONAL_ONLY:
                params.setdefault(p.name, p.annotation)
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not has_var_kw:
            break
    forwarded = KWARGS_FORWARDED_TO.get(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    if has_var_kw and forwarded:
        more, has_var_kw, _ = accepted_parameters(forwarded)
        params.update({k: v for k, v in more.items() if k not in params})
    return params, has_var_kw, owner


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # noqa: BLE001 - annotations that cannot be evaluated: keep the names, drop the types
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None
        return sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()])


def _for_path(table: dict[str, dict], path: str) -> dict:
    out: dict = {}
    for pattern, entries in table.items():
        if fnmatch.fnmatchcase(path, pattern):
            out.update(entries)
    return out


def _unknown(key: str, choices, where: str, prefix: str) -> Problem:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted(choices), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix}.{close[0]}?" if prefix else f"did you mean {close[0]}?"
    elif len(choices) <= 25:
        hint = "allowed: " + ", ".join(sorted(choices))
    else:
        hint = "remove it"
    return Problem(key, f"{key}: not a parameter of {where}; {hint}", "unknown")


def node_problems(path: str, node: DictConfig) -> list[Problem]:
    """Problems of one ``_target_`` node at dotted ``path``."""
    target = _value(node, "_target_")
    if target is _UNRESOLVED or not isinstance(target, str):
        return []
    try:
        params, open_kwargs, owner = accepted_parameters(target)
    except Exception as e:  # noqa: BLE001 - a missing module or a typo in the yaml
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return [Problem(f"{path}._target_", f"{path}._target_={target} cannot be imported ({reason}); "
                        "check the yaml of this group", "unknown")]
    extra = _for_path(FRAMEWORK_KEYS, path)
    injected = _for_path(INJECTED, path)
    if path.startswith("eval.") and "random_baseline" not in node:
        injected.pop("seed", None)  # only passed together with the random baseline
    allowed = ({k for k in params if k not in injected} | set(extra))
    problems = []
    for key, raw in node.items_ex(resolve=False):
        key = str(key)
        dotted = f"{path}.{key}"
        if key in HYDRA_KEYS:
            continue
        if key in injected:
            problems.append(Problem(dotted, f"{dotted}: set by the framework, not by the config "
                                    f"({injected[key]}); remove it", "unknown"))
            continue
        if key not in extra and key not in params:
            if not open_kwargs:
                problems.append(_unknown(dotted, allowed, owner, path))
            continue
        if isinstance(raw, DictConfig) and "_target_" in raw:
            continue  # built by Hydra from its own _target_ (checked as its own node)
        p = _typed(node, key, dotted, extra.get(key, params.get(key)))
        if p is not None:
            problems.append(p)
    return problems


def _target_nodes(node, path: str):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        children = node.items_ex(resolve=False)
    elif isinstance(node, ListConfig):
        children = enumerate(node._iter_ex(resolve=False))
    else:
        return
    for k, v in children:
        if isinstance(v, DictConfig | ListConfig) and not (path == "" and k == "hydra"):
            yield from _target_nodes(v, f"{path}.{k}" if path else str(k))


# ---- the groups without a _target_ --------------------------------------------------------------------
def trainer_problems(cfg: DictConfig) -> list[Problem]:
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig):
        return []
    params, _, _ = accepted_parameters("lightning.Trainer")
    injected = _for_path(INJECTED, "trainer")
    problems = []
    for key, _ in trainer.items_ex(resolve=False):
        dotted = f"trainer.{key}"
        if key in injected:
            problems.append(Problem(dotted, f"{dotted}: set by the framework, not by the config ({injected[key]}); "
                                    "remove it", "unknown"))
        elif key not in params:
            problems.append(_unknown(dotted, set(params) - set(injected), "lightning.Trainer", "trainer"))
        else:
            p = _typed(trainer, key, dotted, params[key])
            if p is not None:
                problems.append(p)
    return problems


def crop_problems(cfg: DictConfig) -> list[Problem]:
    """Keys and value types of each views.crops group (a plain list of dicts, read by src.data.views)."""
    from src.data.views import DEFAULTS

    views = cfg.get("views")
    crops = views.get("crops") if isinstance(views, DictConfig) else None
    if not isinstance(crops, ListConfig):
        return []
    pairs = {"scale", "ratio", "blur_sigma"}
    types_ = {k: (tuple[float, float] if k in pairs else int if k in ("num", "size") else float) for k in DEFAULTS}
    problems = []
    for i, group in enumerate(crops._iter_ex(resolve=False)):
        if not isinstance(group, DictConfig):
            problems.append(Problem(f"views.crops.{i}", f"views.crops.{i}: expected a mapping of crop settings "
                                    f"({', '.join(DEFAULTS)})", "type"))
            continue
        problems += _mapping_problems(group, f"views.crops.{i}", types_, "a views crop group")
    return problems


def _mapping_problems(node: DictConfig, prefix: str, types: dict[str, Any], where: str) -> list[Problem]:
    """Unknown keys (with the closest valid one) and value types of a plain mapping without a ``_target_``."""
    problems = []
    for key, _ in node.items_ex(resolve=False):
        dotted = f"{prefix}.{key}"
        if key not in types:
            problems.append(_unknown(dotted, set(types), where, prefix))
        elif (p := _typed(node, key, dotted, types[key])) is not None:
            problems.append(p)
    return problems


@lru_cache(maxsize=1)
def _primary() -> DictConfig:
    return OmegaConf.load(CONF_DIR / "train.yaml")


def top_level_keys() -> frozenset[str]:
    """The keys conf/train.yaml defines plus one per config group."""
    placed = {"protocols"}  # the protocol group's options sit under protocols.<name> (see conf/train.yaml)
    return frozenset((set(_primary().keys()) | set(config_groups()) | placed) - {"defaults", "hydra", "experiment"})


def checkpoint_keys() -> dict[str, Any]:
    """The keys of conf/train.yaml's ``checkpoint`` node, typed like their defaults (ints stay ints)."""
    node = _primary().get("checkpoint") or {}
    return {str(k): type(v) if isinstance(v, bool | int | float | str) else Any for k, v in node.items()}


def top_level_problems(cfg: DictConfig) -> list[Problem]:
    problems = []
    allowed = top_level_keys()
    for key, _ in cfg.items_ex(resolve=False):
        key = str(key)
        if key == "hydra":
            continue
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "allowed: " + ", ".join(sorted(allowed))
            problems.append(Problem(key, f"{key}: not a config key; {hint}", "unknown"))
        elif key in TOP_LEVEL_TYPES:
            p = _typed(cfg, key, key, TOP_LEVEL_TYPES[key])
            if p is not None:
                problems.append(p)
    checkpoint, known = cfg.get("checkpoint"), checkpoint_keys()
    if isinstance(checkpoint, DictConfig):
        problems += _mapping_problems(checkpoint, "checkpoint", known, "checkpoint")
    return problems


def schema_problems(cfg: DictConfig) -> list[Problem]:
    """Every key and value type problem of a composed config (all of them, in config order)."""
    problems = top_level_problems(cfg)
    for path, node in _target_nodes(cfg, ""):
        problems += node_problems(path, node)
    problems += crop_problems(cfg) + trainer_problems(cfg)
    seen, unique = set(), []
    for p in problems:
        if p.key not in seen:
            seen.add(p.key)
            unique.append(p)
    return unique
