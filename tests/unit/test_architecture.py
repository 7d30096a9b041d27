"""The seams of the architecture, enforced like the device boundary: no code outside a model family's folder names a
family, and packages import only downwards (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from polytrain.models.registry import families
from tests.conftest import ROOT

SRC = ROOT / "src" / "polytrain"
FAMILY_DIRS = {SRC / "models" / family for family in families()}
REGISTRY = SRC / "models" / "registry.py"

# package -> polytrain packages it must not import (at module level or inside functions)
FORBIDDEN = {
    "models": ("parallel", "train", "objectives", "rollout", "algorithms", "data", "config", "plan", "bench", "cli"),
    "data": ("models", "parallel", "train", "objectives", "rollout", "algorithms", "config", "plan", "bench", "cli"),
    "parallel": ("data", "train", "objectives", "rollout", "algorithms", "config", "plan", "bench", "cli"),
    "algorithms": ("parallel", "train", "objectives", "rollout", "config", "plan", "bench", "cli"),
    "rollout": ("train", "objectives", "parallel", "config", "plan", "bench", "cli"),
    "objectives": ("train", "parallel", "plan", "bench", "cli"),
    # the planner asks the objectives what they run (pipeline parallelism, how a step splits): one source of truth
    "plan": ("rollout", "bench", "cli"),
}


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "__pycache__" not in p.parts)


def polytrain_imports(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, imported polytrain module, whether only under `if TYPE_CHECKING:`)."""
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            typing_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polytrain"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, name, id(node) in typing_only) for name in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, id(node) in typing_only) for a in node.names
                    if a.name.startswith("polytrain")]
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downwards(package):
    found = []
    for path in sources():
        if path.relative_to(SRC).parts[0] != package:
            continue
        for line, module, typing_only in polytrain_imports(ast.parse(path.read_text())):
            top = module.split(".")[1] if "." in module else ""
            if top in FORBIDDEN[package] and not typing_only:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not found, "\n".join(found)


def test_objectives_never_call_torch_distributed():
    found = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in sources() if p.relative_to(SRC).parts[0] == "objectives"
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any("torch.distributed" in (getattr(node, "module", None) or "") + a.name for a in node.names)]
    assert not found, found


def family_mentions(path: Path, root: Path = ROOT) -> list[str]:
    """Where code outside a family's folder branches on, or imports, a family."""
    names = set(families())
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            out.append(f"{where}: the string {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "is_v4":
            out.append(f"{where}: .is_v4")
        elif isinstance(node, ast.Compare) and any(isinstance(n, ast.Attribute) and n.attr == "architecture"
                                                   for n in ast.walk(node)):
            out.append(f"{where}: compares .architecture")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
            hits = [m for m in modules if any(f"models.{family}" in m for family in names)]
            out += [f"{where}: imports {m}" for m in hits]
    return out


def test_no_code_outside_a_family_folder_names_a_family():
    found = []
    for path in sources():
        if path == REGISTRY or any(directory in path.parents for directory in FAMILY_DIRS):
            continue
        found += family_mentions(path)
    assert not found, "\n".join(found)


def test_the_family_check_finds_a_branch_on_the_family(tmp_path):
    """The check above fails on the kinds of branching it exists to keep out (so it cannot pass vacuously)."""
    family = families()[-1]
    offender = tmp_path / "offender.py"
    offender.write_text(f"def f(config):\n    if config.architecture == {family!r}:\n        return config.is_v4\n"
                        f"from polytrain.models.{family} import SPEC\n")
    found = family_mentions(offender, tmp_path)
    assert len(found) == 4, found  # the comparison, the string, .is_v4, the import
