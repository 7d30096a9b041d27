"""What a string literal means where it sits: the string rules of the scanner (a mixin of `Scanner`).

The scanner's calls and assignments record a context for the string nodes they hold (`string_context`): a device
argument, a backend argument, an operand of a comparison, a dictionary key, the value of a configuration name (a
variable, field, argparse option or dictionary entry) or a docstring. A string rule matches in its own context or,
with context `any`, anywhere except docstrings.

A configuration value equal to the platform's backend ("nccl") is a process-group backend, rewritten like one, when
its name reaches a backend argument in the module (`init_process_group(backend=args.dist_backend)`) or says so itself
(`distributed_backend`, `--dist-backend`): `resolve_backend_config` decides after the walk, once every use is seen.
"""

from __future__ import annotations

import re
from typing import Any

import libcst as cst

from polytrain.audit.rules import Rule

ATTRIBUTE_FUNCTIONS = {"getattr", "hasattr", "setattr", "delattr"}
PREFIX_METHODS = {"startswith", "endswith"}
NOT_THIS_TEST = ("not rewritten: only `x == \"{0}\"`, `x != \"{0}\"`, `\"{0}\" in x` and `\"{0}\" not in x` are "
                 "rewritten by --fix")


def string_value(node: cst.SimpleString) -> str | None:
    if "b" in node.prefix.lower():
        return None
    try:
        value = node.evaluated_value
    except Exception:  # malformed escapes: not a device string
        return None
    return value if isinstance(value, str) else None


def literals(node: cst.BaseExpression) -> list[cst.SimpleString]:
    """The string nodes of a string or of a tuple / list / set literal of strings."""
    if isinstance(node, cst.SimpleString):
        return [node]
    if isinstance(node, (cst.Tuple, cst.List, cst.Set)):
        return [e.value for e in node.elements if isinstance(e.value, cst.SimpleString)]
    return []


def last_name(node: cst.BaseExpression) -> str | None:
    """`backend` -> "backend", `args.dist_backend` -> "dist_backend", `cfg["backend"]` -> "backend"."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        return node.attr.value
    if isinstance(node, cst.Subscript) and len(node.slice) == 1:
        index = node.slice[0].slice
        if isinstance(index, cst.Index) and isinstance(index.value, cst.SimpleString):
            return string_value(index.value)
    return None


def option_dest(call: cst.Call) -> str | None:
    """The attribute an argparse `add_argument("--dist-backend", ...)` stores to (`dest=` or the long option)."""
    for arg in call.args:
        if arg.keyword is not None and arg.keyword.value == "dest" and isinstance(arg.value, cst.SimpleString):
            return string_value(arg.value)
    options = [string_value(a.value) or "" for a in call.args if a.keyword is None and
               isinstance(a.value, cst.SimpleString)]
    longest = next((o for o in options if o.startswith("--")), options[0] if options else "")
    return longest.lstrip("-").replace("-", "_") or None


def test_form(comparison: Any, string: cst.SimpleString, device: str) -> str | None:
    """How a comparison with the device name reads when --fix can rewrite it: "==", "!=", "in", "not in"."""
    if not isinstance(comparison, cst.Comparison) or len(comparison.comparisons) != 1 or \
            string_value(string) != device:
        return None
    target = comparison.comparisons[0]
    operator = target.operator
    sides = (comparison.left, target.comparator)
    if isinstance(operator, (cst.Equal, cst.NotEqual)) and string in sides and not all(
            isinstance(s, cst.SimpleString) for s in sides):
        return "==" if isinstance(operator, cst.Equal) else "!="
    if isinstance(operator, (cst.In, cst.NotIn)) and comparison.left is string:
        return "in" if isinstance(operator, cst.In) else "not in"
    return None


class StringRules:
    """Mixin of `Scanner`: the string contexts and the string rules. Uses the scanner's `rules`, `target`,
    `strings`, `any_string`, `string_context`, `device_fstring` and `add`."""

    rules: Any
    target: str | None
    strings: dict[str, list[tuple[re.Pattern[str], Rule]]]
    any_string: re.Pattern[str] | None
    string_context: dict[cst.CSTNode, tuple[str, Any]]
    device_fstring: str
    backend_names: set[str]
    config_backends: list[tuple[Any, str, str]]

    def add(self, rule: Rule, node: cst.CSTNode, fix: dict[str, Any] | None = None, subject: str = "",
            note: str = "") -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ contexts
    def mark_call_strings(self, node: cst.Call, qualname: str | None, backend_calls: dict[str, int]) -> None:
        func = node.func
        positional = [a for a in node.args if a.keyword is None and not a.star]
        if qualname == "torch.device" and positional:
            self.string_context[positional[0].value] = ("torch.device", node)
        if isinstance(func, cst.Name) and func.value in ATTRIBUTE_FUNCTIONS and len(positional) > 1:
            self.string_context[positional[1].value] = ("docstring", None)  # hasattr(x, "cuda"): a name, not a device
        if isinstance(func, cst.Attribute) and func.attr.value == "to" and positional:
            self.string_context.setdefault(positional[0].value, ("device", node))
        if isinstance(func, cst.Attribute) and func.attr.value in PREFIX_METHODS and positional:
            for string in literals(positional[0].value):  # name.startswith("cuda"): a test, not a device
                self.string_context[string] = ("compare", None)
        if isinstance(func, cst.Attribute) and func.attr.value == "add_argument":
            dest = option_dest(node)
            for arg in node.args:
                if arg.keyword is not None and arg.keyword.value == "default" and dest:
                    self.string_context.setdefault(arg.value, ("config", dest))
        if qualname in backend_calls and len(positional) > backend_calls[qualname]:
            self._backend_argument(positional[backend_calls[qualname]].value, node)
        for arg in node.args:
            if arg.keyword is None:
                continue
            key = arg.keyword.value
            if key in ("device", "map_location"):
                self.string_context.setdefault(arg.value, ("device", node))
            elif key == "backend":
                self._backend_argument(arg.value, node)
            elif key != "default":
                self.string_context.setdefault(arg.value, ("config", key))

    def _backend_argument(self, value: cst.BaseExpression, call: cst.Call) -> None:
        self.string_context[value] = ("backend", call)
        name = last_name(value)
        if name is not None:
            self.backend_names.add(name)

    def mark_assigned(self, targets: list[cst.BaseExpression], value: cst.BaseExpression | None) -> None:
        """`backend = "nccl"`, `self.backend = "nccl"`, `backend: str = field(default="nccl")`."""
        if value is None:
            return
        if isinstance(value, cst.Call):
            value = next((a.value for a in value.args if a.keyword is not None and a.keyword.value == "default"),
                         None)
        if not isinstance(value, cst.SimpleString):
            return
        for target in targets:
            name = last_name(target)
            if name is not None:
                self.string_context.setdefault(value, ("config", name))

    def visit_Param(self, node: cst.Param) -> None:
        if isinstance(node.default, cst.SimpleString):
            self.string_context.setdefault(node.default, ("config", node.name.value))

    def visit_Comparison(self, node: cst.Comparison) -> None:
        for operand in (node.left, *(c.comparator for c in node.comparisons)):
            for string in literals(operand):
                self.string_context[string] = ("compare", node)

    def visit_MatchValue(self, node: cst.MatchValue) -> None:
        if isinstance(node.value, cst.SimpleString):
            self.string_context[node.value] = ("compare", None)

    def visit_DictElement(self, node: cst.DictElement) -> None:
        if isinstance(node.key, cst.SimpleString):
            self.string_context[node.key] = ("key", None)
            key = string_value(node.key)
            if key and isinstance(node.value, cst.SimpleString):
                self.string_context.setdefault(node.value, ("config", key))

    def visit_Expr(self, node: cst.Expr) -> None:
        if isinstance(node.value, (cst.SimpleString, cst.FormattedString)):  # docstrings, string statements
            self.string_context[node.value] = ("docstring", None)

    # ------------------------------------------------------------------ rules
    def _string_rule(self, value: str, context: str) -> Rule | None:
        for candidate in (context, "any") if context != "any" else ("any",):
            for pattern, rule in self.strings.get(candidate, ()):
                if pattern.search(value):
                    return rule
        return None

    def visit_SimpleString(self, node: cst.SimpleString) -> None:
        if self.any_string is None or len(node.value) > 80:
            return
        value = string_value(node)
        if value is None or not self.any_string.search(value):
            return
        context, extra = self.string_context.get(node, ("any", None))
        if context == "docstring":  # docstrings, string statements, attribute names
            return
        rule = self._string_rule(value, context)
        if rule is None:
            return
        fix, note = dict(rule.fix_for(self.target)), ""
        if fix.get("kind") == "accelerator-test":
            form = test_form(extra, node, self.rules.device) if context == "compare" else None
            if form is None:
                fix, note = {}, NOT_THIS_TEST.format(self.rules.device)
            else:
                fix.update(comparison=extra, form=form)
        elif fix.get("kind") == "rename":
            fix = fix if value in fix["map"] else {}
            fix = {**fix, "value": value} if fix else {}
        elif fix:
            fix.update(value=value, call=extra if isinstance(extra, cst.Call) else None)
        hit = self.add(rule, node, fix or None, repr(value), note)
        if context == "config" and value == self.rules.backend:
            self.config_backends.append((hit, extra, value))

    def visit_FormattedString(self, node: cst.FormattedString) -> None:
        """f"cuda:{rank}": device `rank` of the accelerator (the CPU without one)."""
        parts = node.parts
        if len(parts) < 2 or not isinstance(parts[0], cst.FormattedStringText) or \
                parts[0].value != self.device_fstring or not isinstance(parts[1], cst.FormattedStringExpression):
            return
        context, extra = self.string_context.get(node, ("any", None))
        if context == "docstring":
            return
        rule = self._string_rule(f"{self.device_fstring}0", context)
        if rule is None:
            return
        fix, note = dict(rule.fix_for(self.target)), ""
        simple = len(parts) == 2 and parts[1].conversion is None and parts[1].format_spec is None
        if fix and simple and fix["kind"] in ("torch-device", "device-string", "device-type-string"):
            fix.update(value=None, index=parts[1].expression, call=extra if isinstance(extra, cst.Call) else None)
        elif fix:
            fix, note = {}, f"not rewritten: only f\"{self.device_fstring}{{index}}\" is"
        self.add(rule, node, fix or None, self.module_code(node), note)

    def module_code(self, node: cst.CSTNode) -> str:
        raise NotImplementedError

    def resolve_backend_config(self, backend_rule: Rule | None) -> None:
        """A configured "nccl" whose name reaches a backend argument, or says `backend`, is a backend."""
        if backend_rule is None:
            return
        fix = backend_rule.fix_for(self.target)
        for hit, name, value in self.config_backends:
            if name in self.backend_names or "backend" in name.lower():
                hit.rule, hit.note = backend_rule, ""
                hit.fix = {**fix, "value": value, "call": None} if fix else None
                hit.severity = "auto-fix" if fix else backend_rule.severity
