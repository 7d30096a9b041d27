"""Find the code the rules match in one parsed Python module (libcst), following imports and aliases.

Names are resolved lexically, in one pass: `import torch as t`, `from torch import cuda as c`, `from torch.cuda
import amp`, `from torch.cuda import *` and plain aliases (`c = torch.cuda`) all bind a local name to a qualified
name; function parameters and assignments shadow it inside their function. A name no import binds (a local variable
called `cuda`, a user's own `apex_utils`) never matches a rule. Values are not followed through calls or containers.

The scanner only records *where* a rule matched and what the fixer needs to rewrite it (`Hit`); positions are
computed afterwards, and only for modules with hits (libcst's PositionProvider costs a second pass). What a string
literal means where it sits is strings.py's job; whether a condition and what it guards can be rewritten, guards.py's.
With a `target` ("npu"), the rules' `target_fix` rewrites replace their device-agnostic ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import libcst as cst
from libcst.helpers import get_full_name_for_node

from polytrain.audit.rules import Rule, RuleSet
from polytrain.audit.strings import StringRules, last_name, string_value
from polytrain.audit.walk import FastVisitor

IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException", "OSError"}
DEVICE_VAR_NAMES = ("device", "default_device", "accel_device")
BACKEND_CALLS = {"torch.distributed.init_process_group": 0, "torch.distributed.new_group": 2}
MODULE_SCOPE = 0
FIX_MARK = "# Added by `polytrain audit --fix`"  # the comment above the device variable --fix defines
NOT_THIS_FORM = "not rewritten here: it is not called in the form the fixer knows"


@dataclass
class Hit:
    """One match: the rule, the node it is reported at, and what the fixer needs (`fix` is None: report only)."""

    rule: Rule
    node: cst.CSTNode
    severity: str
    note: str = ""
    fix: dict[str, Any] | None = None
    subject: str = ""  # what matched: the qualified name, module, string, ...


@dataclass
class _Scope:
    names: dict[str, str | None] = field(default_factory=dict)


def _dotted(node: cst.BaseExpression) -> list[str] | None:
    """`a.b.c` -> ["a", "b", "c"]; None for anything that is not a plain attribute chain on a name."""
    parts = []
    while isinstance(node, cst.Attribute):
        parts.append(node.attr.value)
        node = node.value
    if not isinstance(node, cst.Name):
        return None
    parts.append(node.value)
    parts.reverse()
    return parts


class Scanner(StringRules, FastVisitor, cst.CSTVisitor):
    """Collects `hits` for the selected rules; also what the fixer needs: module-level import bindings, the names
    already used (to pick an unused device variable name), and how each imported name is used."""

    def __init__(self, rules: RuleSet, module: cst.Module, target: str | None = None) -> None:
        self.rules = rules
        self.module = module
        self.target = target
        self.hits: list[Hit] = []
        self.qual: dict[str, Rule] = {}
        self.imports: dict[str, Rule] = {}
        self.methods: dict[str, Rule] = {}
        self.attributes: dict[str, Rule] = {}
        self.call_rules: dict[str, Rule] = {}  # call-kwargs and call-sources
        self.strings: dict[str, list[tuple[re.Pattern[str], Rule]]] = {}
        self.index_rule = next((r for r in rules.rules if r.kind == "index"), None)
        self.backend_rule = next((r for r in rules.rules if r.kind == "string" and r.context == "backend" and
                                  any(re.search(p, rules.backend) for p in r.match)), None)
        self.index_name = re.compile("|".join(f"(?:{p})" for p in rules.index_names)) if rules.index_names else None
        for rule in rules.rules:
            table = {"qualname": self.qual, "import": self.imports, "method": self.methods,
                     "attribute": self.attributes, "call-kwargs": self.call_rules,
                     "call-sources": self.call_rules}.get(rule.kind)
            if table is not None:
                for pattern in rule.match:
                    table.setdefault(pattern, rule)
            elif rule.kind == "string":
                self.strings.setdefault(rule.context, []).extend((re.compile(p), rule) for p in rule.match)
        patterns = [p.pattern for entries in self.strings.values() for p, _ in entries]
        self.any_string = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.device_fstring = f"{rules.device}:"
        self.scopes = [_Scope()]
        self.star_modules: list[str] = []
        self.guarded = 0  # depth of try blocks that catch ImportError
        self.skip: set[cst.CSTNode] = set()  # Name nodes that are not references (keywords, attribute names)
        self.string_context: dict[cst.CSTNode, tuple[str, cst.Call | None]] = {}
        self.call_of_func: dict[cst.CSTNode, cst.Call] = {}
        self.decorators: set[cst.CSTNode] = set()
        self.used_names: set[str] = set()
        self.existing_device_var: str | None = None
        self.name_uses: dict[str, int] = {}  # module-level imported name -> references
        self.hit_uses: dict[str, int] = {}  # ... of which replaced by a fix
        self.module_import_nodes: dict[str, cst.ImportAlias] = {}
        self.backend_names: set[str] = set()  # names that reach a backend argument (backend, args.dist_backend)
        self.config_backends: list[tuple[Hit, str, str]] = []  # "nccl" values of configuration names
        self.index_names: set[str] = set()  # variables assigned an integer (int(...), a literal)
        self.path: list[cst.CSTNode] = []  # the walk's nodes from the module down (walk.py)
        self.around_hits: set[cst.CSTNode] = set()  # the hits' nodes and every node above them (guards.py prunes)

    def scan(self) -> Scanner:
        """Walk the module (walk.py: like libcst's `module.visit(self)`, about 5x faster), then decide which
        configured "nccl" values are backends."""
        self.walk(self.module)
        self.finish()
        return self

    def finish(self) -> None:
        """What needs the whole module seen (also call it after `module.visit(scanner)`)."""
        self.resolve_backend_config(self.backend_rule)

    def add(self, rule: Rule, node: cst.CSTNode, fix: dict[str, Any] | None = None, subject: str = "",
            note: str = "") -> Hit:
        """Record a hit: auto-fix when it has a fix; an auto-fix rule without one here is manual."""
        if fix:
            severity = "auto-fix"
        else:
            severity = "manual" if rule.severity == "auto-fix" else rule.severity
            if rule.severity == "auto-fix" and not note:
                note = NOT_THIS_FORM
        return self.keep(Hit(rule, node, severity, note, fix or None, subject))

    def keep(self, hit: Hit) -> Hit:
        self.hits.append(hit)
        self.around_hits.update(self.path)
        self.around_hits.add(hit.node)
        return hit

    def module_code(self, node: cst.CSTNode) -> str:
        return self.module.code_for_node(node)

    # ------------------------------------------------------------------ names
    def _bind(self, name: str, qualname: str | None) -> None:
        self.scopes[-1].names[name] = qualname
        if name in DEVICE_VAR_NAMES:
            self.used_names.add(name)

    def _lookup(self, name: str) -> tuple[str | None, bool]:
        """(qualified name or None, bound at module level)."""
        for depth in range(len(self.scopes) - 1, -1, -1):
            names = self.scopes[depth].names
            if name in names:
                return names[name], depth == MODULE_SCOPE
        for module in self.star_modules:
            candidate = f"{module}.{name}"
            if candidate in self.qual:
                return candidate, True
        return None, False

    def _resolve(self, node: cst.BaseExpression) -> tuple[str | None, str | None]:
        """(qualified name, the module-level imported name it goes through) of a Name or attribute chain."""
        parts = _dotted(node)
        if parts is None:
            return None, None
        base, at_module = self._lookup(parts[0])
        if base is None:
            return None, None
        return ".".join([base, *parts[1:]]), parts[0] if at_module else None

    def _match_qual(self, qualname: str) -> tuple[Rule, str] | None:
        parts = qualname.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end]) if end < len(parts) else qualname
            rule = self.qual.get(prefix)
            if rule is not None:
                return rule, prefix
        return None

    def _count_use(self, local: str | None, fixed: bool) -> None:
        if local is not None and local in self.module_import_nodes:
            self.name_uses[local] = self.name_uses.get(local, 0) + 1
            if fixed:
                self.hit_uses[local] = self.hit_uses.get(local, 0) + 1

    def _reference(self, node: cst.BaseExpression, qualname: str, local: str | None) -> None:
        """A Name / attribute chain that resolved to `qualname`: report it when a qualname rule matches."""
        found = self._match_qual(qualname)
        if found is None:
            self._count_use(local, False)
            return
        rule, pattern = found
        fix = None
        rule_fix = rule.fix_for(self.target)
        attr = qualname.rsplit(".", 1)[-1]
        if rule_fix and pattern == qualname and attr in rule_fix.get("only", (attr,)):
            kind = rule_fix["kind"]
            call = self.call_of_func.get(node)
            starred = call is not None and any(a.star for a in call.args)
            if kind == "name" or (kind == "amp-decorator" and (call is not None or node in self.decorators)) or \
                    (kind in ("call", "device-module", "legacy-tensor") and call is not None) or \
                    (kind == "amp" and call is not None and not starred):
                fix = {**rule_fix, "attr": attr, "call": call}
        self.add(rule, node, fix, qualname, NOT_THIS_FORM if rule_fix and fix is None else "")
        self._count_use(local, fix is not None)

    def visit_Name(self, node: cst.Name) -> bool:
        if node in self.skip:
            return False
        if node.value in DEVICE_VAR_NAMES:
            self.used_names.add(node.value)
        qualname, at_module = self._lookup(node.value)
        if qualname is not None:
            self._reference(node, qualname, node.value if at_module else None)
        return False

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        attr_rule = self.attributes.get(node.attr.value)
        if attr_rule is not None:  # x.is_cuda: a test, rewritten only where guards.py says so
            fix = attr_rule.fix_for(self.target)
            self.add(attr_rule, node, {**fix, "form": "attribute"} if fix else None, f".{node.attr.value}")
        parts = _dotted(node)
        if parts is None:  # `f().x`: look inside the value, not at the attribute name
            self.skip.add(node.attr)
            return True
        if parts[0] in DEVICE_VAR_NAMES:
            self.used_names.add(parts[0])
        qualname, local = self._resolve(node)
        if qualname is not None:
            self._reference(node, qualname, local)
        return False

    # ------------------------------------------------------------------ scopes and bindings
    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self._bind(node.name.value, None)
        self.skip.add(node.name)
        self.scopes.append(_Scope())
        params = node.params
        for param in (*params.posonly_params, *params.params, *params.kwonly_params):
            self._bind(param.name.value, None)
        for star in (params.star_arg, params.star_kwarg):
            if isinstance(star, cst.Param):
                self._bind(star.name.value, None)

    def leave_FunctionDef(self, original_node: cst.FunctionDef) -> None:
        self.scopes.pop()

    def visit_Param(self, node: cst.Param) -> None:
        self.skip.add(node.name)
        StringRules.visit_Param(self, node)

    def visit_ClassDef(self, node: cst.ClassDef) -> None:
        self._bind(node.name.value, None)
        self.skip.add(node.name)
        self.scopes.append(_Scope())

    def leave_ClassDef(self, original_node: cst.ClassDef) -> None:
        self.scopes.pop()

    def visit_SimpleStatementLine(self, node: cst.SimpleStatementLine) -> None:
        """The device variable an earlier --fix defined: reused, so a second run changes nothing."""
        if len(self.scopes) == 1 and any(line.comment is not None and line.comment.value.startswith(FIX_MARK)
                                         for line in node.leading_lines):
            statement = node.body[0]
            if isinstance(statement, cst.Assign) and isinstance(statement.targets[0].target, cst.Name):
                self.existing_device_var = statement.targets[0].target.value

    def visit_Assign(self, node: cst.Assign) -> None:
        value, _ = self._resolve(node.value)
        self.mark_assigned([t.target for t in node.targets], node.value)
        for target in node.targets:
            if isinstance(target.target, cst.Name):
                self._bind(target.target.value, value)
                self.skip.add(target.target)
                if self._integer(node.value):
                    self.index_names.add(target.target.value)
                if len(self.scopes) == 1 and isinstance(node.value, cst.BooleanOperation) and \
                        "current_accelerator()" in self.module.code_for_node(node.value):
                    self.existing_device_var = self.existing_device_var or target.target.value
            elif isinstance(target.target, (cst.Tuple, cst.List)):
                for element in target.target.elements:
                    if isinstance(element.value, cst.Name):
                        self._bind(element.value.value, None)
                        self.skip.add(element.value)

    def visit_AnnAssign(self, node: cst.AnnAssign) -> None:
        self.mark_assigned([node.target], node.value)
        if isinstance(node.target, cst.Name):
            self._bind(node.target.value, None)
            self.skip.add(node.target)

    def visit_Arg(self, node: cst.Arg) -> None:
        if node.keyword is not None:
            self.skip.add(node.keyword)

    def visit_Decorator(self, node: cst.Decorator) -> None:
        self.decorators.add(node.decorator)

    def visit_Try(self, node: cst.Try) -> None:
        self.guarded += any(self._catches_import_error(h.type) for h in node.handlers)

    def leave_Try(self, original_node: cst.Try) -> None:
        self.guarded -= any(self._catches_import_error(h.type) for h in original_node.handlers)

    @staticmethod
    def _catches_import_error(kind: cst.BaseExpression | None) -> bool:
        if kind is None:
            return True
        names = [e.value for e in kind.elements] if isinstance(kind, cst.Tuple) else [kind]
        return any((get_full_name_for_node(n) or "").rsplit(".", 1)[-1] in IMPORT_ERRORS for n in names)

    # ------------------------------------------------------------------ imports
    def _import_hit(self, node: cst.CSTNode, modules: list[str]) -> None:
        seen = set()
        for module in modules:
            parts = module.split(".")
            for end in range(len(parts), 0, -1):
                rule = self.imports.get(".".join(parts[:end]))
                if rule is not None:
                    if rule.id not in seen:
                        seen.add(rule.id)
                        if self.guarded:
                            self.keep(Hit(rule, node, "portable", "optional import (under try/except "
                                          "ImportError): the fallback runs where the package is missing",
                                          subject=module))
                        else:
                            self.keep(Hit(rule, node, rule.severity, subject=module))
                    break

    def visit_Import(self, node: cst.Import) -> bool:
        modules = []
        for alias in node.names:
            full = get_full_name_for_node(alias.name)
            if full is None:
                continue
            modules.append(full)
            if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
                local = alias.asname.name.value
                self._bind(local, full)
            else:
                local = full.split(".")[0]
                self._bind(local, local)
            if len(self.scopes) == 1 and self._match_qual(full) is not None:
                self.module_import_nodes[local] = alias
        self._import_hit(node, modules)
        return False

    def visit_ImportFrom(self, node: cst.ImportFrom) -> bool:
        module = get_full_name_for_node(node.module) if node.module is not None else None
        if node.relative:  # the project's own modules
            module = None
        if isinstance(node.names, cst.ImportStar):
            if module is not None:
                self.star_modules.append(module)
                self._import_hit(node, [module])
            return False
        modules = [module] if module is not None else []
        for alias in node.names:
            name = get_full_name_for_node(alias.name) or ""
            local = alias.asname.name.value if alias.asname is not None and isinstance(alias.asname.name, cst.Name) \
                else name
            full = f"{module}.{name}" if module is not None else None
            self._bind(local, full)
            if full is not None:
                modules.append(full)
                if len(self.scopes) == 1 and self._match_qual(full) is not None:
                    self.module_import_nodes[local] = alias
        self._import_hit(node, modules)
        return False

    # ------------------------------------------------------------------ calls and their arguments
    def visit_Call(self, node: cst.Call) -> None:
        func = node.func
        self.call_of_func[func] = node
        qualname, _ = self._resolve(func)
        self.mark_call_strings(node, qualname, BACKEND_CALLS)
        method_hit = False
        if isinstance(func, cst.Attribute) and func.attr.value in self.methods:
            receiver, _ = self._resolve(func.value)
            if receiver is None:  # `x.cuda()`, not `torch.cuda` or `numba.cuda` used as a module
                rule = self.methods[func.attr.value]
                fix = rule.fix_for(self.target)
                target = _device_argument(node)
                if fix and target is not None:
                    fix = {**fix, "index_like": self.index_like(target.value)}
                self.add(rule, node, dict(fix) if fix else None, f".{func.attr.value}()")
                self.skip.add(func.attr)
                method_hit = True
        if self.index_rule is not None and not method_hit:
            self._device_index(node, qualname)
        rule = self.call_rules.get(qualname) if qualname else None
        if rule is not None:
            self._call_rule(rule, node, qualname)

    # ------------------------------------------------------------------ integer devices
    def _integer(self, node: cst.BaseExpression) -> bool:
        if isinstance(node, cst.Integer):
            return True
        if isinstance(node, cst.Call) and isinstance(node.func, cst.Name) and node.func.value == "int":
            return True
        return isinstance(node, cst.BinaryOperation) and isinstance(node.operator, cst.Modulo) and \
            self.index_like(node.left)

    def names_index(self, node: cst.BaseExpression) -> bool:
        """A variable whose name says it holds a device index (local_rank, args.gpu, device_id)."""
        name = last_name(node) if isinstance(node, (cst.Name, cst.Attribute)) else None
        return name is not None and self.index_name is not None and self.index_name.search(name) is not None

    def index_like(self, node: cst.BaseExpression) -> bool:
        """An integer device index: a literal, int(...), x % n of one, or a variable named or assigned so."""
        return self._integer(node) or self.names_index(node) or (
            isinstance(node, cst.Name) and node.value in self.index_names)

    def _device_index(self, node: cst.Call, qualname: str | None) -> None:
        """.to(local_rank), device=rank, torch.device(args.gpu): device i of the accelerator."""
        func = node.func
        positional = [a for a in node.args if a.keyword is None and not a.star]
        candidates: list[tuple[cst.BaseExpression, cst.CSTNode]] = []
        if isinstance(func, cst.Attribute) and func.attr.value == "to" and positional:
            candidates.append((positional[0].value, positional[0].value))
        if qualname == "torch.device" and len(node.args) == 1 and positional:
            candidates.append((positional[0].value, node))
        candidates += [(a.value, a.value) for a in node.args if a.keyword is not None and a.keyword.value == "device"]
        rule = self.index_rule
        assert rule is not None
        fix = rule.fix_for(self.target)
        for value, replaced in candidates:
            if self.names_index(value):
                self.add(rule, value, {**fix, "index": value, "replace": replaced} if fix else None,
                         self.module.code_for_node(value))

    def _call_rule(self, rule: Rule, node: cst.Call, qualname: str) -> None:
        if rule.kind == "call-kwargs":
            names = [a.keyword.value for a in node.args if a.keyword is not None and a.keyword.value in rule.kwargs]
            if names:
                self.keep(Hit(rule, node, rule.severity, fix={**rule.fix_for(self.target), "names": names},
                              subject=", ".join(names)))
            return
        sources = [re.compile(p) for p in rule.sources]
        strings = [n for a in node.args for n in _strings_in(a.value)]
        cuda_kwargs = [a for a in node.args if a.keyword is not None and a.keyword.value in rule.kwargs and
                       not (isinstance(a.value, cst.Name) and a.value.value in ("False", "None"))]
        if cuda_kwargs or any(any(p.search(s) for p in sources) for s in strings):
            self.keep(Hit(rule, node, rule.severity, subject=qualname))

    # ------------------------------------------------------------------ results for the fixer
    def removable_imports(self) -> set[cst.ImportAlias]:
        """Module-level imports of matched names whose every use a fix replaces (they would be left unused)."""
        return {alias for name, alias in self.module_import_nodes.items()
                if self.name_uses.get(name, 0) > 0 and self.hit_uses.get(name, 0) == self.name_uses[name]}


def _device_argument(call: cst.Call) -> cst.Arg | None:
    """The device of `x.cuda(device, ...)`: the first positional argument or `device=`."""
    for arg in call.args:
        if (arg.keyword is None and not arg.star) or (arg.keyword is not None and arg.keyword.value == "device"):
            return arg
    return None


def _strings_in(node: cst.BaseExpression) -> list[str]:
    if isinstance(node, cst.SimpleString):
        value = string_value(node)
        return [value] if value is not None else []
    if isinstance(node, (cst.List, cst.Tuple, cst.Set)):
        return [s for e in node.elements for s in _strings_in(e.value)]
    return []
