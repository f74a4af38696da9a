"""The floors of ../shared/DESIGN.md section 12, read from every module's imports: a floor may import the floors
below it, never above; the Lightning-free rooms (nn, protocols) never import Lightning."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {"train", "eval", "export", "search", "report", "embed", "bench"}
# floor -> what it must never import (src packages, commands, or "lightning")
FORBIDDEN = {
    "utils": {"data", "methods", "callbacks", "protocols", "backbones", "nn", "config", *COMMANDS},
    "nn": {"data", "methods", "callbacks", "protocols", "backbones", "config", "lightning", *COMMANDS},
    "data": {"methods", "callbacks", "protocols", "backbones", "config", *COMMANDS},
    "backbones": {"data", "methods", "callbacks", "protocols", "config", *COMMANDS},
    "protocols": {"methods", "callbacks", "config", "lightning", *COMMANDS},
    "methods": {"callbacks", "protocols", "config", *COMMANDS},
    "callbacks": {"config", *COMMANDS},
    "config": {"callbacks", "protocols", *COMMANDS},
}


def imported(path: Path) -> set[str]:
    """The src packages (``src.<name>``) and top-level libraries a module imports, at any depth (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for m in modules:
            parts = m.split(".")
            names.add(parts[1] if parts[0] == "src" and len(parts) > 1 else parts[0])
    return names


@pytest.mark.parametrize("floor", sorted(FORBIDDEN))
def test_a_floor_imports_nothing_above_it(floor):
    wrong = {str(p.relative_to(SRC)): sorted(imported(p) & FORBIDDEN[floor] - {floor})
             for p in sorted((SRC / floor).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}, f"src/{floor} imports a floor above it: {wrong}"


def test_the_rule_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lightning.pytorch.utilities import rank_zero_info\n    import src.methods.base\n")
    assert {"lightning", "methods"} <= imported(module)
