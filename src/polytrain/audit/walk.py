"""A fast read-only walk over a libcst tree, calling `visit_<Node>` / `leave_<Node>` like `module.visit(visitor)`.

libcst's own visitor rebuilds every node on the way back, even for read-only visitors; this walk does not, which
makes it about 5x faster. Children are visited in field order, which is source order except decorators (after the
function body). Fields that hold only whitespace, comments and punctuation are not descended into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import libcst as cst

PUNCTUATION_FIELDS = {"lpar", "rpar", "comma", "dot", "semicolon", "leading_lines", "lines_after_decorators", "header",
                      "footer", "trailing_whitespace", "equal", "colon"}

_Plan = tuple[Callable[..., Any] | None, Callable[..., Any] | None, tuple[str, ...]]
_PLANS: dict[tuple[type, type], _Plan] = {}


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)
                 if not f.name.startswith("whitespace") and f.name not in PUNCTUATION_FIELDS)


class FastVisitor:
    """Base of the read-only visitors: `walk(node)` visits `node` and everything under it; `path` holds the nodes
    from the root down to the one being visited."""

    path: list[cst.CSTNode]

    def walk(self, node: cst.CSTNode) -> None:
        cls = type(node)
        plan = _PLANS.get((type(self), cls))
        if plan is None:
            plan = _PLANS[(type(self), cls)] = (getattr(type(self), f"visit_{cls.__name__}", None),
                                                getattr(type(self), f"leave_{cls.__name__}", None), _fields(cls))
        visit, leave, fields = plan
        path = self.path
        path.append(node)
        if visit is not None and visit(self, node) is False:
            path.pop()
            return
        for name in fields:
            child = getattr(node, name)
            if isinstance(child, cst.CSTNode):
                self.walk(child)
            elif isinstance(child, (tuple, list)):
                for item in child:
                    if isinstance(item, cst.CSTNode):
                        self.walk(item)
        if leave is not None:
            leave(self, node)
        path.pop()


def children(node: cst.CSTNode) -> list[cst.CSTNode]:
    """The child nodes `FastVisitor.walk` descends into, in the same order."""
    cls = type(node)
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = _fields(cls)
    found: list[cst.CSTNode] = []
    for name in fields:
        child = getattr(node, name)
        if isinstance(child, cst.CSTNode):
            found.append(child)
        elif isinstance(child, (tuple, list)):
            found.extend(item for item in child if isinstance(item, cst.CSTNode))
    return found


_FIELDS: dict[type, tuple[str, ...]] = {}
