"""Rewrite the auto-fixable hits of one module, keeping everything else byte for byte (libcst round-trips).

The rewrites use one device variable, defined once after the imports:

    device = torch.accelerator.current_accelerator() or torch.device("cpu")

the accelerator in use (cuda, npu, xpu, ...) or the CPU when there is none (current_accelerator() is None then). Its
name is `device` unless the module already uses that name anywhere; then `default_device`, then `accel_device`. A
module that already has such a definition (an earlier --fix) reuses it, so a second run changes nothing.

Replacement names are written through the module's own imports (`dist.get_default_backend_for_device` when
`torch.distributed` is imported as `dist`); `import torch` is added when the module lacks it. Imports of names
whose every use was rewritten (`from torch.cuda.amp import GradScaler, autocast`) are removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import libcst as cst

from polytrain.audit.scanner import DEVICE_VAR_NAMES, Hit, Scanner

Fix = Callable[[cst.CSTNode], cst.CSTNode]
DEVICE_COMMENT = "# Added by `polytrain audit --fix`: the accelerator in use (cuda, npu, ...), or the CPU without one."
INDEXED = re.compile(r"^(?P<type>[a-z]+):(?P<index>\d+)$")


class _Rewrite(cst.CSTTransformer):
    def __init__(self, fixes: dict[cst.CSTNode, list[Fix]], removable: set[cst.ImportAlias]) -> None:
        self.fixes = fixes
        self.removable = removable
        self.applied: set[cst.CSTNode] = set()

    def on_leave(self, original_node: Any, updated_node: Any) -> Any:
        updated = super().on_leave(original_node, updated_node)
        for fix in self.fixes.get(original_node, ()):
            updated = fix(updated)
            self.applied.add(original_node)
        return updated

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


class Fixer:
    """Builds the fix of every fixable hit of a scanned module and applies them in one libcst transform."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self.bindings = scanner.module_bindings()
        self.device = scanner.existing_device_var or next(
            (n for n in DEVICE_VAR_NAMES if n not in scanner.used_names), "polytrain_device")
        self.uses_device = False
        self.needs_torch = False

    # ---------------------------------------------------------------- expressions in the module's own names
    def express(self, qualname: str) -> str:
        best = None
        for local, target in self.bindings.items():
            if qualname == target or qualname.startswith(target + "."):
                rank = (len(target), local == target)
                if best is None or rank > best[0]:
                    best = (rank, local, target)
        if best is None:
            self.needs_torch = self.needs_torch or qualname.split(".")[0] == "torch"
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
        if kind == "call":
            to = self.expr(self.express(fix["to"].format(name=fix["attr"])))
            return hit.node, lambda _node: to
        if kind == "device-module":
            to = self.expr(f"{self.express('torch.get_device_module')}({self.dev()}).{fix['attr']}")
            return hit.node, lambda _node: to
        if kind == "name":
            to = self.expr(self.express(fix["to"]))
            return hit.node, lambda _node: to
        if kind == "amp":
            return call, self._amp(fix)
        if kind == "amp-decorator":
            to = self.express(fix["to"].format(name=fix["attr"]))
            keyword = cst.Arg(keyword=cst.Name(fix["device_param"]), value=self.expr(self.dev(".type")),
                              equal=cst.AssignEqual(cst.SimpleWhitespace(""), cst.SimpleWhitespace("")))
            if call is not None:
                return call, lambda node: node.with_changes(func=self.expr(to), args=[*node.args, keyword])
            decorated = cst.Call(func=self.expr(to), args=[keyword])
            return hit.node, lambda _node: decorated
        if kind == "to-device":
            return hit.node, self._to_device
        if kind == "drop-kwargs":
            return hit.node, self._drop_kwargs(set(fix["names"]))
        if kind == "fstring":
            return hit.node, self._fstring
        if kind in ("torch-device", "device-string", "device-type-string", "backend"):
            return self._string(kind, fix["value"], hit.node, call)
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
            first = cst.Arg(self.expr(self.dev(".type")))
            return node.with_changes(func=self.expr(to), args=[first, *args])
        return rewrite

    def _to_device(self, node: cst.Call) -> cst.Call:
        index = None
        rest = []
        for arg in node.args:
            if index is None and ((arg.keyword is None and not arg.star) or
                                  (arg.keyword is not None and arg.keyword.value == "device")):
                index = arg.value
            else:
                rest.append(arg)
        if index is None:
            target = self.expr(self.dev())
        else:
            target = cst.Call(self.expr(self.express("torch.device")),
                              [cst.Arg(self.expr(self.dev(".type"))), cst.Arg(index)])
        func = node.func.with_changes(attr=cst.Name("to"))
        if not node.args:  # `.cuda( )`: no stray space before the new argument
            node = node.with_changes(whitespace_before_args=cst.SimpleWhitespace(""))
        if rest:
            return node.with_changes(func=func, args=[cst.Arg(target), *rest])
        return node.with_changes(func=func, args=[cst.Arg(target)])

    @staticmethod
    def _drop_kwargs(names: set[str]) -> Fix:
        def rewrite(node: cst.Call) -> cst.Call:
            keep = [a for a in node.args if a.keyword is None or a.keyword.value not in names]
            if keep and keep[-1] is not node.args[-1]:
                keep[-1] = keep[-1].with_changes(comma=node.args[-1].comma)
            return node.with_changes(args=keep)
        return rewrite

    def _fstring(self, node: cst.FormattedString) -> cst.FormattedString:
        device_type = cst.FormattedStringExpression(self.expr(self.dev(".type")))
        return node.with_changes(parts=[device_type, cst.FormattedStringText(":"), *node.parts[1:]])

    def _string(self, kind: str, value: str, node: cst.CSTNode, call: cst.Call | None) -> tuple[cst.CSTNode, Fix]:
        indexed = INDEXED.match(value)
        torch_device = self.express("torch.device")
        if kind == "backend":
            backend = self.expr(f"{self.express('torch.distributed.get_default_backend_for_device')}({self.dev()})")
            return node, lambda _node: backend
        if kind == "torch-device" and call is not None and len(call.args) == 1:
            if indexed is None:
                device = self.expr(self.dev())
                return call, lambda _node: device
            args = [cst.Arg(self.expr(self.dev(".type"))), cst.Arg(cst.Integer(indexed["index"]))]
            return call, lambda updated: updated.with_changes(args=args)
        if kind == "device-string":
            new = self.dev() if indexed is None else f"{torch_device}({self.dev('.type')}, {indexed['index']})"
        else:  # device-type-string, or torch.device("cuda", index)
            new = self.dev(".type") if indexed is None else f'f"{{{self.dev(".type")}}}:{indexed["index"]}"'
        replacement = self.expr(new)
        return node, lambda _node: replacement

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
        rewrite = _Rewrite(fixes, self.scanner.removable_imports())
        new = module.visit(rewrite)
        done = [hit for hit, node in planned if node in rewrite.applied]
        return self._define_device(new), done

    def _define_device(self, module: cst.Module) -> cst.Module:
        define = []
        if self.uses_device and self.scanner.existing_device_var is None:
            code = (f"{self.device} = {self.express('torch.accelerator.current_accelerator')}() or "
                    f"{self.express('torch.device')}(\"cpu\")\n")
            define.append(cst.parse_statement(code).with_changes(
                leading_lines=[cst.EmptyLine(), cst.EmptyLine(comment=cst.Comment(DEVICE_COMMENT))]))
        if self.needs_torch:
            define.insert(0, cst.parse_statement("import torch\n"))
        if not define:
            return module
        body = list(module.body)
        at = 0
        while at < len(body) and _is_import_line(body[at]):
            at += 1
        if at == 0 and define[0].leading_lines:  # nothing above: no blank line at the top of the file
            define[0] = define[0].with_changes(leading_lines=define[0].leading_lines[1:])
        return module.with_changes(body=[*body[:at], *define, *body[at:]])
