"""Line and column of a few nodes of a libcst module, for a fraction of the cost of PositionProvider.

libcst's PositionProvider records a CodeRange for every node of the module while it regenerates the code (it costs
about twice the parse). The auditor needs positions for the handful of nodes it reports, so this code-generation
state tracks a character offset only, records offsets for the requested nodes only (with the same syntactic-position
rules as PositionProvider), stops once the last of them is generated, and converts offsets to (line, column). The
tests check it agrees with PositionProvider.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

import libcst as cst
from libcst._nodes.internal import CodegenState


class _AllFound(Exception):
    pass


class _OffsetState(CodegenState):
    def __init__(self, module: cst.Module, targets: set[cst.CSTNode]) -> None:
        super().__init__(default_indent=module.default_indent, default_newline=module.default_newline)
        self.targets = targets
        self.remaining = set(targets)
        self.offset = 0
        self.found: dict[cst.CSTNode, tuple[int, int]] = {}
        self.open: list[tuple[cst.CSTNode, int]] = []

    def add_indent_tokens(self) -> None:
        self.tokens.extend(self.indent_tokens)
        self.offset += sum(len(t) for t in self.indent_tokens)

    def add_token(self, value: str) -> None:
        self.tokens.append(value)
        self.offset += len(value)

    def before_codegen(self, node: cst.CSTNode) -> None:
        if node in self.targets:
            self.open.append((node, self.offset))

    def after_codegen(self, node: cst.CSTNode) -> None:
        if self.open and self.open[-1][0] is node:
            _, start = self.open.pop()
            self.found.setdefault(node, (start, self.offset))
            self._done(node)

    def _done(self, node: cst.CSTNode) -> None:
        self.remaining.discard(node)
        if not self.remaining:
            raise _AllFound

    @contextmanager
    def record_syntactic_position(self, node: cst.CSTNode, *, start_node: cst.CSTNode | None = None,
                                  end_node: cst.CSTNode | None = None) -> Iterator[None]:
        if node not in self.targets:
            yield
            return
        for child in (start_node, end_node):
            if child is not None:
                self.targets.add(child)
        start = self.offset
        yield
        end = self.offset
        if start_node is not None and start_node in self.found:
            start = self.found[start_node][0]
        if end_node is not None and end_node in self.found:
            end = self.found[end_node][1]
        self.found[node] = (start, end)
        self._done(node)


def node_positions(module: cst.Module, nodes: Iterable[cst.CSTNode]) -> dict[cst.CSTNode, tuple[int, int, int, int]]:
    """{node: (line, column, end line, end column)}: lines 1-based, columns 0-based (as libcst's CodeRange)."""
    state = _OffsetState(module, set(nodes))
    with suppress(_AllFound):  # every requested node is placed: the rest of the module is not needed
        module._codegen(state)
    code = "".join(state.tokens)
    starts = [0]
    index = code.find("\n")
    while index != -1:
        starts.append(index + 1)
        index = code.find("\n", index + 1)

    def where(offset: int) -> tuple[int, int]:
        line = bisect_right(starts, offset)
        return line, offset - starts[line - 1]

    return {node: (*where(a), *where(b)) for node, (a, b) in state.found.items()}
