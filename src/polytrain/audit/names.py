"""Names a module reads that nothing binds when they are read: the check --fix runs on every rewritten file.

`undefined_names(source)` counts, per name, the reads that would raise NameError:

- at import time, in order: a top-level statement (with the class bodies, decorators, default values, base classes
  and, without `from __future__ import annotations`, annotations it runs) may only read module names bound by an
  earlier statement or by itself, so a definition placed before `import torch` is caught;
- in function bodies, lambdas and comprehensions: names bound in the function, an enclosing function, anywhere at
  module level or in builtins;
- imports under `if TYPE_CHECKING:` bind nothing (they never run), and what such a block reads is not checked.

It is deliberately simple (any binding in a branch counts; `del` is ignored; a star import binds every name): the
fixer compares the counts before and after a rewrite, so what it cannot tell affects both sides alike, and a name the
rewrite leaves unbound shows up as one more read.
"""

from __future__ import annotations

import ast
import builtins
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

BUILTINS = set(dir(builtins)) | {"__file__", "__name__", "__doc__", "__spec__", "__loader__", "__package__",
                                 "__builtins__", "__path__", "__annotations__", "__dict__", "__cached__"}
CLASS_NAMES = {"__module__", "__qualname__", "__class__"}


@dataclass
class _Scope:
    kind: str  # module, function, class, comprehension
    parent: _Scope | None
    bound: set[str] = field(default_factory=set)
    declared_global: set[str] = field(default_factory=set)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Binder(ast.NodeVisitor):
    """First pass: what each scope binds; for the module, at which top-level statement each name is first bound."""

    def __init__(self, future_annotations: bool) -> None:
        self.future = future_annotations
        self.module = _Scope("module", None)
        self.first: dict[str, int] = {}  # module name -> index of the first top-level statement binding it
        self.scopes: dict[ast.AST, _Scope] = {}
        self.stack = [self.module]
        self.statement = 0
        self.star = False

    def bind(self, name: str) -> None:
        scope = self.stack[-1]
        if scope.kind == "comprehension":  # only the walrus binds outside; targets stay in the comprehension
            scope.bound.add(name)
            return
        if name in scope.declared_global:
            scope = self.module
        scope.bound.add(name)
        if scope is self.module:
            self.first.setdefault(name, self.statement if len(self.stack) == 1 else -1)

    def run(self, tree: ast.Module) -> None:
        for index, statement in enumerate(tree.body):
            self.statement = index
            self.visit(statement)

    def _enter(self, node: ast.AST, kind: str) -> _Scope:
        scope = self.scopes[node] = _Scope(kind, self.stack[-1])
        self.stack.append(scope)
        return scope

    def visit_If(self, node: ast.If) -> None:
        if _type_checking(node):  # never runs: binds nothing
            for statement in node.orelse:
                self.visit(statement)
            return
        self.generic_visit(node)

    def visit_Global(self, node: ast.Global) -> None:
        self.stack[-1].declared_global.update(node.names)
        for name in node.names:
            self.module.bound.add(name)
            self.first.setdefault(name, -1)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.stack[-1].bound.update(node.names)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            self.bind(node.id)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        depth = len(self.stack) - 1
        while self.stack[depth].kind == "comprehension":
            depth -= 1
        saved, self.stack = self.stack, self.stack[:depth + 1]
        self.bind(node.target.id)
        self.stack = saved
        self.visit(node.value)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.bind(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.star = True
            else:
                self.bind(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.bind(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.bind(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.bind(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.bind(node.rest)
        self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for default in (*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]):
            self.visit(default)
        if not isinstance(node, ast.Lambda):
            self.bind(node.name)
            for decorator in node.decorator_list:
                self.visit(decorator)
        scope = self._enter(node, "function")
        arguments = node.args
        for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                    arguments.kwarg):
            if arg is not None:
                scope.bound.add(arg.arg)
        for statement in [node.body] if isinstance(node, ast.Lambda) else node.body:
            self.visit(statement)
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expression in (*node.bases, *[k.value for k in node.keywords], *node.decorator_list):
            self.visit(expression)
        self.bind(node.name)
        self._enter(node, "class")
        for statement in node.body:
            self.visit(statement)
        self.stack.pop()

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        _walk_comprehension(self, node, lambda: self._enter(node, "comprehension"))

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


class _Reader(ast.NodeVisitor):
    """Second pass: every read, resolved against the scopes of the first."""

    def __init__(self, binder: _Binder) -> None:
        self.binder = binder
        self.stack = [binder.module]
        self.deferred = 0  # depth of function bodies: reads there happen later, at call time
        self.statement = 0
        self.missing: Counter[str] = Counter()

    def run(self, tree: ast.Module) -> Counter[str]:
        for index, statement in enumerate(tree.body):
            self.statement = index
            self.visit(statement)
        return self.missing

    def visit_If(self, node: ast.If) -> None:
        if _type_checking(node):
            for statement in node.orelse:
                self.visit(statement)
            return
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load) and not self._resolves(node.id):
            self.missing[node.id] += 1

    def _resolves(self, name: str) -> bool:
        scope: _Scope | None = self.stack[-1]
        first = True
        while scope is not None and scope.kind != "module":
            if name in scope.declared_global:
                break
            if name in scope.bound and (first or scope.kind != "class"):
                return True
            if scope.kind == "class" and name in CLASS_NAMES:
                return True
            first = False
            scope = scope.parent
        binder = self.binder
        if name in binder.module.bound:
            bound_at = binder.first.get(name, -1)
            return self.deferred > 0 or bound_at <= self.statement
        if name == "__class__" and self.deferred:
            return True
        return name in BUILTINS or binder.star

    def _annotation(self, node: ast.expr | None) -> None:
        if node is not None and not self.binder.future:
            self.visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for default in (*node.args.defaults, *[d for d in node.args.kw_defaults if d is not None]):
            self.visit(default)
        if not isinstance(node, ast.Lambda):
            for decorator in node.decorator_list:
                self.visit(decorator)
            arguments = node.args
            for arg in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                        arguments.kwarg):
                if arg is not None:
                    self._annotation(arg.annotation)
            self._annotation(node.returns)
        self.stack.append(self.binder.scopes[node])
        self.deferred += 1
        for statement in [node.body] if isinstance(node, ast.Lambda) else node.body:
            self.visit(statement)
        self.deferred -= 1
        self.stack.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if self.stack[-1].kind != "function":
            self._annotation(node.annotation)
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_arg(self, node: ast.arg) -> None:  # annotations are read by _function
        return

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expression in (*node.bases, *[k.value for k in node.keywords], *node.decorator_list):
            self.visit(expression)
        self.stack.append(self.binder.scopes[node])
        for statement in node.body:
            self.visit(statement)
        self.stack.pop()

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        _walk_comprehension(self, node, lambda: self.stack.append(self.binder.scopes[node]))

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def _walk_comprehension(visitor: _Binder | _Reader, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp,
                        enter: Callable[[], object]) -> None:
    """Visit a comprehension in the order Python evaluates it: the first iterable in the enclosing scope, then
    (inside its own scope, entered by `enter`) the targets, the other iterables, the conditions, the element."""
    visitor.visit(node.generators[0].iter)
    enter()
    for number, generator in enumerate(node.generators):
        visitor.visit(generator.target)
        if number:
            visitor.visit(generator.iter)
        for condition in generator.ifs:
            visitor.visit(condition)
    for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
        visitor.visit(part)
    visitor.stack.pop()


def undefined_names(source: str | bytes) -> Counter[str]:
    """{name: reads that nothing binds when they run}; raises SyntaxError when the source does not compile."""
    tree = ast.parse(source)
    future = any(isinstance(s, ast.ImportFrom) and s.module == "__future__" and
                 any(a.name == "annotations" for a in s.names) for s in tree.body)
    binder = _Binder(future)
    binder.run(tree)
    return _Reader(binder).run(tree)


def names_gained(before: str | bytes, after: str | bytes) -> list[str]:
    """Names `after` reads unbound more often than `before` does (sorted); SyntaxError when `after` does not
    compile."""
    old, new = undefined_names(before), undefined_names(after)
    return sorted(name for name, count in new.items() if count > old.get(name, 0))
