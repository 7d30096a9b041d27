"""Enforce the device boundary: outside polytrain/backends/, no code names a device.

Flags (in code, not comments or docstrings): the string literals "cuda", "npu", "nccl", "hccl" (also "cuda:0"),
attribute access `.cuda` / `.npu` (torch.cuda.*, tensor.cuda()), and importing torch_npu.
Usage: python scripts/check_device_code.py [ROOT ...]   (exit 1 and one line per finding when any is found)
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

DEVICE_STRING = re.compile(r"^(cuda|npu|nccl|hccl)(:\d+)?$", re.IGNORECASE)
DEVICE_ATTRS = {"cuda", "npu"}
ALLOWED_DIR = "backends"


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def find_violations(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if DEVICE_STRING.match(node.value.strip()):
                found.append(f"{filename}:{line}: device literal {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in DEVICE_ATTRS:
            found.append(f"{filename}:{line}: device-specific attribute `.{node.attr}`")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "torch_npu" for a in node.names):
            found.append(f"{filename}:{line}: import torch_npu")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch_npu":
            found.append(f"{filename}:{line}: import from torch_npu")
    return sorted(found, key=lambda v: int(v.split(":")[1]))


def check_tree(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if ALLOWED_DIR in path.relative_to(root).parts:
            continue
        found.extend(find_violations(path.read_text(encoding="utf-8"), str(path)))
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path("src/polytrain")]
    found = [v for root in roots for v in check_tree(root)]
    for violation in found:
        print(violation)
    if found:
        print(f"{len(found)} device-specific reference(s) outside {ALLOWED_DIR}/: move them behind polytrain.backends")
        return 1
    print(f"device boundary clean: {', '.join(map(str, roots))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
