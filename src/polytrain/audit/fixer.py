"""Rewrite the auto-fixable hits of one module, keeping everything else byte for byte (libcst round-trips).

The rewrites use one device variable, defined once at module level:

    device = torch.accelerator.current_accelerator() or torch.device("cpu")

the accelerator in use (cuda, npu, xpu, ...) or the CPU when there is none (current_accelerator() is None then). Its
name is `device` unless the module already uses that name anywhere; then `default_device`, then `accel_device`. A
module that already has such a definition (an earlier --fix) reuses it, so a second run changes nothing. The
definition goes after the leading imports and after the import that binds the name it is written with (`import
torch` after other statements, or after an `if TYPE_CHECKING:` block), so it never runs before that import.

Replacement names are written through the module's own top-level imports (`dist.get_default_backend_for_device` when
`torch.distributed` is imported as `dist`; imports under an `if` do not count: `if TYPE_CHECKING:` never runs);
`import torch` is added when the module lacks such an import. Imports of names whose every use was rewritten
(`from torch.cuda.amp import GradScaler, autocast`) are removed. How the device, its type, device i and the backend
are spelled is spelling.py's job (device-agnostic, or Ascend-only under --target npu).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import libcst as cst
from libcst.helpers import get_full_name_for_node

from polytrain.audit.rules import Target
from polytrain.audit.scanner import DEVICE_VAR_NAMES, FIX_MARK, Hit, Scanner
from polytrain.audit.spelling import Spelling

Fix = Callable[[Any], cst.CSTNode]
DEVICE_COMMENT = f"{FIX_MARK}: the accelerator in use (cuda, npu, ...), or the CPU without one."
TARGET_COMMENT = f"{FIX_MARK}: the {{}} device (--target {{}})."
INDEXED = re.compile(r"^(?P<type>[a-z]+):(?P<index>\d+)$")


class _Rewrite(cst.CSTTransformer):
    def __init__(self, fixes: dict[cst.CSTNode, list[Fix]], removable: set[cst.ImportAlias], say: Spelling) -> None:
        self.fixes = fixes
        self.removable = removable
        self.say = say
        self.applied: set[cst.CSTNode] = set()

    def on_leave(self, original_node: Any, updated_node: Any) -> Any:
        updated = super().on_leave(original_node, updated_node)
        for fix in self.fixes.get(original_node, ()):
            updated = fix(updated)
            self.applied.add(original_node)
        return self.say.strip_parentheses(updated)

    def _drop_aliases(self, original: cst.Import | cst.ImportFrom, updated: Any) -> Any:
        names = updated.names
        if isinstance(names, cst.ImportStar):
            return updated
        keep = [new for old, new in zip(original.names, names) if old not in self.removable]
        if len(keep) == len(names):
            return updated
        if not keep:
            return cst.RemoveFromParent()
        keep[-1] = keep[-1].with_changes(comma=names[-1].comma)
        return updated.with_changes(names=keep)

    def leave_Import(self, original_node: cst.Import, updated_node: cst.Import) -> Any:
        return self._drop_aliases(original_node, updated_node)

    def leave_ImportFrom(self, original_node: cst.ImportFrom, updated_node: cst.ImportFrom) -> Any:
        return self._drop_aliases(original_node, updated_node)


def _is_import_line(statement: cst.CSTNode) -> bool:
    if isinstance(statement, cst.SimpleStatementLine):
        return all(isinstance(s, (cst.Import, cst.ImportFrom)) for s in statement.body) or (
            len(statement.body) == 1 and isinstance(statement.body[0], cst.Expr) and
            isinstance(statement.body[0].value, (cst.SimpleString, cst.ConcatenatedString)))
    if isinstance(statement, cst.Try):
        return all(_is_import_line(s) for s in statement.body.body)
    return False


def _imports(statement: cst.CSTNode) -> list[cst.Import | cst.ImportFrom]:
    """The imports a top-level statement always runs: its own, or those of a `try:` body (an optional import).
    Imports under `if` (TYPE_CHECKING, __main__, a version test) may not run, so the fixer does not rely on them."""
    if isinstance(statement, cst.SimpleStatementLine):
        return [s for s in statement.body if isinstance(s, (cst.Import, cst.ImportFrom))]
    if isinstance(statement, cst.Try):
        return [i for s in statement.body.body for i in _imports(s)]
    return []


def runtime_imports(module: cst.Module) -> dict[str, tuple[str, int]]:
    """{local name: (qualified name, index of the top-level statement that first binds it)}, for the imports that
    always run when the module is imported."""
    bound: dict[str, tuple[str, int]] = {}
    for index, statement in enumerate(module.body):
        for node in _imports(statement):
            if isinstance(node, cst.Import):
                for alias in node.names:
                    full = get_full_name_for_node(alias.name) or ""
                    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                        bound.setdefault(alias.asname.name.value, (full, index))
                    else:
                        bound.setdefault(full.split(".")[0], (full.split(".")[0], index))
            elif not node.relative and node.module is not None and not isinstance(node.names, cst.ImportStar):
                module_name = get_full_name_for_node(node.module)
                for alias in node.names:
                    name = get_full_name_for_node(alias.name) or ""
                    local = alias.asname.name.value if alias.asname is not None and \
                        isinstance(alias.asname.name, cst.Name) else name
                    bound.setdefault(local, (f"{module_name}.{name}", index))
    return bound


class Fixer:
    """Builds the fix of every fixable hit of a scanned module and applies them in one libcst transform."""

    def __init__(self, scanner: Scanner, target: Target | None = None) -> None:
        self.scanner = scanner
        self.target = target
        self.imports = runtime_imports(scanner.module)
        self.device = scanner.existing_device_var or next(
            (n for n in DEVICE_VAR_NAMES if n not in scanner.used_names), "polytrain_device")
        self.uses_device = False
        self.needs: set[str] = set()  # top-level packages the rewrites name but the module does not import
        self.say = Spelling(self)

    # ---------------------------------------------------------------- expressions in the module's own names
    def express(self, qualname: str) -> str:
        best = None
        for local, (target, _) in self.imports.items():
            if qualname == target or qualname.startswith(target + "."):
                rank = (len(target), local == target)
                if best is None or rank > best[0]:
                    best = (rank, local, target)
        if best is None:
            self.needs.add(qualname.split(".")[0])
            return qualname
        return best[1] + qualname[len(best[2]):]

    def dev(self, suffix: str = "") -> str:
        self.uses_device = True
        return self.device + suffix

    @staticmethod
    def expr(code: str) -> cst.BaseExpression:
        return cst.parse_expression(code)

    # ---------------------------------------------------------------- one fix per hit
    def plan(self, hit: Hit) -> tuple[cst.CSTNode, Fix] | None:
        fix = hit.fix or {}
        kind = fix.get("kind")
        call = fix.get("call")
        say = self.say
        if kind == "call":
            to = self.expr(self.express(fix["to"].format(name=fix["attr"])))
            return hit.node, lambda _node: to
        if kind == "device-module":
            to = self.expr(f"{self.express('torch.get_device_module')}({self.dev()}).{fix['attr']}")
            return hit.node, lambda _node: to
        if kind == "name":
            to = self.expr(self.express(fix["to"]))
            return hit.node, lambda _node: to
        if kind == "legacy-tensor":
            to = self.expr(self.express(fix["to"].format(name=fix["attr"])))
            return call, lambda node: cst.Call(cst.Attribute(node.with_changes(func=to), cst.Name("to")),
                                               [cst.Arg(self.expr(self.dev()))])
        if kind == "amp":
            return call, self._amp(fix)
        if kind == "amp-decorator":
            to = self.express(fix["to"].format(name=fix["attr"]))
            keyword = cst.Arg(keyword=cst.Name(fix["device_param"]), value=say.device_type(),
                              equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
            if call is not None:
                return call, lambda node: node.with_changes(func=self.expr(to), args=[*node.args, keyword])
            decorated = cst.Call(func=self.expr(to), args=[keyword])
            return hit.node, lambda _node: decorated
        if kind == "to-device":
            return hit.node, lambda node: say.to_device(node, fix.get("index_like", False))
        if kind == "rename-method":
            return hit.node, say.rename_method
        if kind == "drop-kwargs":
            return hit.node, self._drop_kwargs(set(fix["names"]))
        if kind == "device-index":  # the index itself, or torch.device(index)
            if fix["replace"] is fix["index"]:
                return fix["replace"], say.indexed_device
            return fix["replace"], lambda node: say.indexed_device(node.args[0].value)
        if kind == "accelerator-test":
            if fix["form"] == "attribute":
                return hit.node, say.attribute_test
            return fix["comparison"], lambda node: say.comparison(node, fix["form"])
        if kind == "rename":
            new = fix["map"][fix["value"]]
            return hit.node, lambda node: node.with_changes(value=f"{node.prefix}{node.quote}{new}{node.quote}")
        if kind in ("torch-device", "device-string", "device-type-string", "backend"):
            return self._string(kind, fix, hit.node, call)
        return None

    def _amp(self, fix: dict[str, Any]) -> Fix:
        to = self.express(fix["to"])
        old = fix["old_params"]

        def rewrite(node: cst.Call) -> cst.Call:
            args, index = [], 0
            for arg in node.args:
                if arg.keyword is None and not arg.star and index < len(old):
                    arg = arg.with_changes(keyword=cst.Name(old[index]), equal=cst.AssignEqual(
                        cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
                    index += 1
                args.append(arg)
            first = cst.Arg(self.say.device_type())
            return node.with_changes(func=self.expr(to), args=[first, *args])
        return rewrite

    @staticmethod
    def _drop_kwargs(names: set[str]) -> Fix:
        def rewrite(node: cst.Call) -> cst.Call:
            keep = [a for a in node.args if a.keyword is None or a.keyword.value not in names]
            if keep and keep[-1] is not node.args[-1]:
                keep[-1] = keep[-1].with_changes(comma=node.args[-1].comma)
            return node.with_changes(args=keep)
        return rewrite

    def _string(self, kind: str, fix: dict[str, Any], node: cst.CSTNode,
                call: cst.Call | None) -> tuple[cst.CSTNode, Fix]:
        """"cuda", "cuda:1", f"cuda:{rank}" (and torch.device("cuda", i) through its first argument). Each rewrite
        is built from the node as already rewritten inside (f"cuda:{torch.cuda.current_device()}" keeps the
        rewrite of its index)."""
        say = self.say
        value = fix.get("value")
        indexed = INDEXED.match(value) if value else None
        literal = cst.Integer(indexed["index"]) if indexed is not None else None
        in_fstring = fix.get("index") is not None  # f"cuda:{index}"
        has_index = in_fstring or literal is not None

        def index_of(string: Any) -> cst.BaseExpression:
            return string.parts[1].expression if in_fstring else literal

        if kind == "backend":
            return node, lambda _node: say.backend()
        if kind == "torch-device" and call is not None and len(call.args) == 1:
            return call, lambda updated: say.indexed_device(index_of(updated.args[0].value)) if has_index \
                else say.device()
        if kind == "torch-device" and call is not None and not has_index:  # torch.device("cuda", i)
            second = call.args[1] if len(call.args) == 2 else None
            if second is not None and (second.keyword is None or second.keyword.value == "index") and \
                    not second.star:
                return call, lambda updated: say.indexed_device(updated.args[1].value)
            return node, lambda _node: say.device_type()
        if kind in ("device-string", "torch-device"):
            return node, lambda updated: say.indexed_device(index_of(updated)) if has_index else say.device()
        if not has_index:
            return node, lambda _node: say.device_type()
        return node, lambda updated: say.indexed_string(index_of(updated), updated)

    # ---------------------------------------------------------------- the whole module
    def apply(self, module: cst.Module, hits: list[Hit]) -> tuple[cst.Module, list[Hit]]:
        """(rewritten module, the hits rewritten)."""
        fixes: dict[cst.CSTNode, list[Fix]] = {}
        planned: list[tuple[Hit, cst.CSTNode]] = []
        for hit in hits:
            step = self.plan(hit) if hit.fix is not None else None
            if step is not None:
                fixes.setdefault(step[0], []).append(step[1])
                planned.append((hit, step[0]))
        if not planned:
            return module, []
        rewrite = _Rewrite(fixes, self.scanner.removable_imports(), self.say)
        new = module.visit(rewrite)
        done = [hit for hit, node in planned if node in rewrite.applied]
        return self._define_device(new), done

    def _define_device(self, module: cst.Module) -> cst.Module:
        define: list[cst.BaseStatement] = []
        if self.uses_device and self.scanner.existing_device_var is None:
            code, comment = self.say.definition(self.device)
            define.append(cst.parse_statement(code + "\n").with_changes(
                leading_lines=[cst.EmptyLine(), cst.EmptyLine(comment=cst.Comment(comment))]))
        package = self.say.package_import()
        if package is not None:
            define.insert(0, cst.parse_statement(package + "\n"))
        for name in sorted(self.needs, reverse=True):
            define.insert(0, cst.parse_statement(f"import {name}\n"))
        if not define:
            return module
        body = list(module.body)
        at = 0
        while at < len(body) and _is_import_line(body[at]):
            at += 1
        for root in self.say.definition_roots():  # after the import that binds what the definition names
            if root in self.imports:
                at = max(at, self.imports[root][1] + 1)
        if at == 0 and define[0].leading_lines:  # nothing above: no blank line at the top of the file
            define[0] = define[0].with_changes(leading_lines=define[0].leading_lines[1:])
        return module.with_changes(body=[*body[:at], *define, *body[at:]])
