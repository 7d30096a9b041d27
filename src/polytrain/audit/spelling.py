"""How --fix spells the device, its type, device i, the backend and a device test.

Device-agnostic (the default), through the device variable `device` the fixer defines:

    device          the accelerator in use, or the CPU          .cuda() -> .to(device)
    device.type     "cuda" / "npu" / "cpu"                      "cuda" -> device.type
    device i        torch.device(device.type, i) if device.type != "cpu" else device
                    (the CPU has one device: "cpu:1" would break map_location when a checkpoint is loaded)
    backend         dist.get_default_backend_for_device(device)  (nccl, hccl or gloo)
    tests           x == "cuda" -> x != "cpu", "cuda" in x -> "cpu" not in x, x.is_cuda -> x.device.type != "cpu"
                    (on any accelerator, as the CUDA branch meant "on the GPU")

Ascend-only code (`--fix --target npu`: [target.npu] in rules.toml) says "npu", torch.device("npu", i), "hccl",
x == "npu", x.is_npu, .npu(), and imports torch_npu.
"""

from __future__ import annotations

from typing import Any

import libcst as cst

PAREN_FREE = {cst.Arg: "value", cst.Assign: "value", cst.AnnAssign: "value", cst.Return: "value",
              cst.DictElement: "value", cst.Element: "value", cst.If: "test", cst.While: "test", cst.Assert: "test",
              cst.IfExp: "test", cst.BooleanOperation: ("left", "right")}


class Spelling:
    """The expressions of one fixer (its device variable and imports), device-agnostic or for its target."""

    def __init__(self, fixer: Any) -> None:
        self.fixer = fixer
        self.target = fixer.target
        self.wrapped: dict[int, cst.CSTNode] = {}  # the parenthesised expressions made here (kept alive: ids hold)

    def _wrap(self, node: cst.BaseExpression) -> cst.BaseExpression:
        """Parenthesised, so it stays one expression wherever it lands; `strip_parentheses` unwraps it where a whole
        value or test needs none."""
        wrapped = node.with_changes(lpar=[cst.LeftParen()], rpar=[cst.RightParen()])
        self.wrapped[id(wrapped)] = wrapped
        return wrapped

    def strip_parentheses(self, node: Any) -> Any:
        """`node` with the parentheses of the rewrites' own expressions removed where its fields need none."""
        fields = PAREN_FREE.get(type(node))
        if fields is None or not self.wrapped:
            return node
        changes = {}
        for name in (fields,) if isinstance(fields, str) else fields:
            value = getattr(node, name, None)
            if value is not None and self.wrapped.get(id(value)) is value:
                if isinstance(node, cst.BooleanOperation) and isinstance(value, (cst.IfExp, cst.BooleanOperation)):
                    continue  # `a and (b if c else d)` keeps its parentheses
                changes[name] = value.with_changes(lpar=[], rpar=[])
        return node.with_changes(**changes) if changes else node

    def _e(self, code: str) -> cst.BaseExpression:
        return cst.parse_expression(code)

    def _string(self, value: str, like: cst.CSTNode | None = None) -> cst.SimpleString:
        quote = like.quote if isinstance(like, cst.SimpleString) and like.quote in ("'", '"') else '"'
        return cst.SimpleString(f"{quote}{value}{quote}")

    def _code(self, node: cst.CSTNode) -> str:
        return cst.Module([]).code_for_node(node)

    # ---------------------------------------------------------------- the device
    def device(self) -> cst.BaseExpression:
        return self._e(self.fixer.dev())

    def device_type(self) -> cst.BaseExpression:
        if self.target is not None:
            return self._string(self.target.device)
        return self._e(self.fixer.dev(".type"))

    def indexed_device(self, index: cst.BaseExpression) -> cst.BaseExpression:
        """Device `index` of the accelerator; the CPU itself on a machine without one."""
        torch_device = self.fixer.express("torch.device")
        if self.target is not None:
            return cst.Call(self._e(torch_device), [cst.Arg(self._string(self.target.device)), cst.Arg(index)])
        device = self.fixer.dev()
        on_accelerator = self._e(f'{device}.type != "cpu"')
        body = cst.Call(self._e(torch_device), [cst.Arg(self._e(f"{device}.type")), cst.Arg(index)])
        return self._wrap(cst.IfExp(test=on_accelerator, body=body, orelse=self._e(device)))

    def indexed_string(self, index: cst.BaseExpression, original: cst.CSTNode) -> cst.BaseExpression:
        """The string "cuda:i" / f"cuda:{i}" names device i: f"{device.type}:{i}", "cpu" without an accelerator."""
        if isinstance(original, cst.FormattedString):
            quote = original.end
            head: list[cst.BaseFormattedStringContent] = []
            rest = list(original.parts[1:])
        else:
            quote = original.quote if isinstance(original, cst.SimpleString) else '"'
            head, rest = [], [cst.FormattedStringText(self._code(index))]
        if self.target is not None:
            parts = [*head, cst.FormattedStringText(f"{self.target.device}:"), *rest]
            return cst.FormattedString(parts=parts, start=f"f{quote}", end=quote)
        device = self.fixer.dev()
        parts = [*head, cst.FormattedStringExpression(self._e(f"{device}.type")), cst.FormattedStringText(":"), *rest]
        named = cst.FormattedString(parts=parts, start=f"f{quote}", end=quote)
        return self._wrap(cst.IfExp(test=self._e(f'{device}.type != "cpu"'), body=named,
                               orelse=cst.SimpleString(f"{quote}cpu{quote}")))

    def backend(self) -> cst.BaseExpression:
        if self.target is not None:
            return self._string(self.target.backend)
        return self._e(f"{self.fixer.express('torch.distributed.get_default_backend_for_device')}"
                       f"({self.fixer.dev()})")

    # ---------------------------------------------------------------- tests
    def comparison(self, node: cst.Comparison, form: str) -> cst.BaseExpression:
        """x == "cuda" -> x != "cpu" (any accelerator); "cuda" in x -> "cpu" not in x. Ascend: x == "npu"."""
        target = node.comparisons[0]
        string = node.left if isinstance(node.left, cst.SimpleString) else target.comparator
        if self.target is not None:
            new_string = self._string(self.target.device, string)
            operator = target.operator
        else:
            new_string = self._string("cpu", string)
            flipped: dict[str, type[cst.BaseCompOp]] = {"==": cst.NotEqual, "!=": cst.Equal, "in": cst.NotIn,
                                                       "not in": cst.In}
            old = target.operator
            operator = flipped[form](whitespace_before=old.whitespace_before, whitespace_after=old.whitespace_after) \
                if form in ("==", "!=") else self._membership(form, old)
        if string is node.left:
            node = node.with_changes(left=new_string.with_changes(lpar=string.lpar, rpar=string.rpar))
            comparator = target.comparator
        else:
            comparator = new_string.with_changes(lpar=string.lpar, rpar=string.rpar)
        return node.with_changes(comparisons=[target.with_changes(operator=operator, comparator=comparator)])

    @staticmethod
    def _membership(form: str, old: Any) -> cst.BaseCompOp:
        before = old.whitespace_before
        after = old.whitespace_after
        if form == "in":  # -> not in
            return cst.NotIn(whitespace_before=before, whitespace_between=cst.SimpleWhitespace(" "),
                             whitespace_after=after)
        return cst.In(whitespace_before=before, whitespace_after=after)

    def attribute_test(self, node: cst.Attribute) -> cst.BaseExpression:
        """x.is_cuda -> x.device.type != "cpu"; Ascend: x.is_npu."""
        if self.target is not None:
            return node.with_changes(attr=cst.Name(f"is_{self.target.device}"))
        value = self._code(node.value)
        return self._wrap(self._e(f'{value}.device.type != "cpu"'))

    # ---------------------------------------------------------------- .cuda()
    def to_device(self, node: cst.Call, index_like: bool) -> cst.Call:
        """.cuda() -> .to(device); .cuda(i) -> .to(device i); .cuda(d) -> .to(d) (a device, or a name of one)."""
        if self.target is not None:
            return self.rename_method(node)
        target_arg, rest = None, []
        for arg in node.args:
            if target_arg is None and ((arg.keyword is None and not arg.star) or
                                       (arg.keyword is not None and arg.keyword.value == "device")):
                target_arg = arg
            else:
                rest.append(arg)
        if target_arg is None:
            target = self.device()
        elif index_like:
            target = self.indexed_device(target_arg.value).with_changes(lpar=[], rpar=[])
        else:
            target = target_arg.value
        func = node.func.with_changes(attr=cst.Name("to"))
        if not node.args:  # `.cuda( )`: no stray space before the new argument
            node = node.with_changes(whitespace_before_args=cst.SimpleWhitespace(""))
        return node.with_changes(func=func, args=[cst.Arg(target), *rest])

    def rename_method(self, node: cst.Call) -> cst.Call:
        name = self.target.device if self.target is not None else "to"
        return node.with_changes(func=node.func.with_changes(attr=cst.Name(name)))

    # ---------------------------------------------------------------- the definition
    def definition(self, name: str) -> tuple[str, str]:
        """(the statement that defines the device variable, the comment above it)."""
        from polytrain.audit.fixer import DEVICE_COMMENT, TARGET_COMMENT

        torch_device = self.fixer.express("torch.device")
        if self.target is not None:
            return (f'{name} = {torch_device}("{self.target.device}")',
                    TARGET_COMMENT.format(self.target.device, self.target.name))
        current = self.fixer.express("torch.accelerator.current_accelerator")
        return f'{name} = {current}() or {torch_device}("cpu")', DEVICE_COMMENT

    def definition_roots(self) -> set[str]:
        names = ["torch.device"] + ([] if self.target is not None else ["torch.accelerator.current_accelerator"])
        return {self.fixer.express(n).split(".")[0] for n in names}

    def package_import(self) -> str | None:
        """`import torch_npu` for Ascend-only code, unless the module imports it."""
        if self.target is None or self.target.package in self.fixer.imports:
            return None
        return f"import {self.target.package}  # noqa: F401 (registers the {self.target.device} device)"
