"""Files that are never half-written: text and JSON go to a temporary file beside the target, then one atomic
rename (``os.replace``) puts it in place, so a kill leaves either the old file or the new one. Checkpoints have
their own writer (:func:`src.utils.checkpointing.atomic_torch_save`), which also syncs to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, record: Any) -> Path:
    """``record`` as indented JSON (values JSON cannot hold are written as their ``str``)."""
    return write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
