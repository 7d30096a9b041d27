"""Conditions and dispatch: which hits --fix may rewrite, given the tests around them.

A *condition* (torch.cuda.is_available(), `device.type == "cuda"`, `x.is_cuda`: rules with `condition = true`) in the
test of an if / elif / while / assert or a conditional expression decides what runs. Rewriting the test without what
it guards, or the guarded code without the test, changes what the program does off NVIDIA while it looks ported:
`device_type = "cuda" if "cuda" in device else "cpu"` with only one of its two "cuda" rewritten runs an NPU job
without autocast. So a test with a condition and everything it guards (its body, and every later elif / else) are
rewritten together or not at all: when one hit there has no rewrite (a capability check, flash-attn, a device
comparison --fix does not know), none is rewritten and each says why.

A variable that holds a condition (`use_cuda = torch.cuda.is_available()`) is part of every test that reads it:
when one of those is not rewritten, neither is the variable, nor what the other tests reading it guard (with only
one of them ported, `if use_cuda and torch.cuda.is_bf16_supported(): ... elif use_cuda: <fp16>` would train in fp16
on an NPU). Device comparisons (`x == "cuda"`, `"cuda" in x`, `x.is_cuda`) are rewritten only inside such a test:
elsewhere what they decide is not visible.

Code that already *dispatches* per device is left alone: an if / elif chain (or a run of consecutive ifs, as in
`if device.type == "cuda": return ...` then `if device.type == "npu": return ...`), a conditional expression or a
match whose tests name another platform ("npu", torch.npu, hccl, ...: [platform] others in rules.toml) keeps its
CUDA branch (test and body) unreported; so does the CUDA entry of a dictionary or tuple that has an entry for another
platform. A dictionary keyed by "cuda" without one is reported (PA209), its key never rewritten.
"""

from __future__ import annotations

import libcst as cst

from polytrain.audit.scanner import Hit, Scanner
from polytrain.audit.strings import string_value
from polytrain.audit.walk import children

OUTSIDE_TEST = ("not rewritten: a device test outside an if / while / assert / conditional-expression test (what it "
                "decides is not visible here)")


class Guards:
    """Applies the rules above to a scanner's hits: `resolve()` returns the hits kept, some with their fix removed."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self.module = scanner.module
        self.device = scanner.rules.device
        self.others = set(scanner.rules.others)
        # Only nodes with a hit at or under them matter (the scanner's walk records them); without that record
        # (a scanner run through libcst's own visitor) every node is looked at.
        self.around = scanner.around_hits or None
        self.by_node: dict[cst.CSTNode, list[Hit]] = {}
        for hit in scanner.hits:
            self.by_node.setdefault(hit.node, []).append(hit)
        self.dropped: set[int] = set()  # id(hit): already handled per device
        self.in_test: set[int] = set()  # id(hit): device comparisons accepted as part of a rewritable test
        self.condition_vars: dict[str, list[Hit]] = {}  # name -> the hits of the conditions assigned to it
        self.condition_values: list[tuple[str, list[Hit]]] = []  # (code, hits) of each value assigned a condition
        self.kept_tests: dict[str, tuple[str, str]] = {}  # name -> (a test that reads it and is kept, why)

    def resolve(self) -> list[Hit]:
        if not self.scanner.hits:
            return []
        if any(h.rule.condition for h in self.scanner.hits):
            self._find_condition_vars(self.module)
        while True:  # until no variable holding a condition is read by a test left as it is (blocks only grow)
            self.dropped, self.in_test, self.kept_tests = set(), set(), {}
            self._collect(self.module)
            held = [(name, hit) for name, test in self.kept_tests.items()
                    for hit in self.condition_vars.get(name, ()) if hit.fix is not None]
            for name, hit in held:
                test, why = self.kept_tests[name]
                self._block(hit, f"not rewritten: `{name}` is read by the test `{test}`, which is kept as it is "
                                 f"({why}): a condition and what it decides change together")
            if not held and not self._assigned_conditions():
                break
        for hit in self.scanner.hits:
            if hit.fix is not None and hit.fix.get("kind") == "accelerator-test" and id(hit) not in self.in_test \
                    and id(hit) not in self.dropped:
                self._block(hit, OUTSIDE_TEST)
        return [h for h in self.scanner.hits if id(h) not in self.dropped]

    # ---------------------------------------------------------------- the walk: hits under a node, decided
    def _collect(self, node: cst.CSTNode) -> list[Hit]:
        if self.around is not None and node not in self.around:
            return []
        if isinstance(node, cst.If):
            found = self._chain(*_if_chain(node))
        elif isinstance(node, cst.IfExp):
            found = self._chain(*_ifexp_chain(node))
        elif isinstance(node, cst.While):
            found = self._unit(node.test, self._collect(node.test),
                               self._collect(node.body) + (self._collect(node.orelse) if node.orelse else []))
        elif isinstance(node, cst.Assert):
            found = self._unit(node.test, self._collect(node.test),
                               self._collect(node.msg) if node.msg is not None else [])
        elif isinstance(node, cst.Match):
            found = self._match(node)
        elif isinstance(node, (cst.Module, cst.IndentedBlock)):
            found = self._block_body(list(node.body))
        else:
            found = [h for child in children(node) for h in self._collect(child)]
            if isinstance(node, cst.Dict):
                self._table(node)
            elif isinstance(node, (cst.Tuple, cst.List, cst.Set)):
                self._sequence(node)
        return [h for h in self.by_node.get(node, ()) if id(h) not in self.dropped] + \
            [h for h in found if id(h) not in self.dropped]

    def _chain(self, branches: list[tuple[cst.BaseExpression, cst.CSTNode]], orelse: cst.CSTNode | None) -> list[Hit]:
        """if / elif / else (or a chain of conditional expressions): a dispatch when a test names another platform,
        else nested units, each test guarding its body and everything after it."""
        if any(self._names_other(test) for test, _ in branches):
            found: list[Hit] = []
            cuda_branch = False
            for test, body in branches:
                test_hits, body_hits = self._collect(test), self._collect(body)
                if test_hits:  # the CUDA branch of a dispatch: correct as it is
                    cuda_branch = True
                    self._drop(test_hits + body_hits)
                else:
                    found += body_hits
            if orelse is not None:
                else_hits = self._collect(orelse)
                if cuda_branch:
                    found += else_hits
                else:  # `if is_npu: ... else: <CUDA>`: the else is the CUDA branch
                    self._drop(else_hits)
            return found
        rest = self._collect(orelse) if orelse is not None else []
        for test, body in reversed(branches):
            rest = self._unit(test, self._collect(test), self._collect(body) + rest)
        return rest

    def _assigned_conditions(self) -> bool:
        """A condition assigned to a variable is rewritten whole or not at all (`ok = torch.cuda.is_available() and
        torch.cuda.get_device_capability()[0] >= 8`). True when that blocked a rewrite."""
        blocked = False
        for code, hits in self.condition_values:
            live = [h for h in hits if id(h) not in self.dropped]
            stuck = next((h for h in live if not self._rewritable(h, set())), None)
            if stuck is None:
                continue
            for hit in live:
                if hit.fix is not None:
                    self._block(hit, f"not rewritten: the condition `{code}` is rewritten whole or not at all, and "
                                     f"{stuck.subject or stuck.rule.name} ({stuck.rule.id}) has no rewrite")
                    blocked = True
        return blocked

    def _find_condition_vars(self, node: cst.CSTNode) -> None:
        """`use_cuda = torch.cuda.is_available() and not args.cpu`: the names that hold a condition."""
        if self.around is not None and node not in self.around:
            return
        if isinstance(node, (cst.Assign, cst.AnnAssign)) and node.value is not None:
            value_hits = self._under(node.value)
            if any(h.rule.condition for h in value_hits):
                self.condition_values.append((_short(self.module.code_for_node(node.value)), value_hits))
                targets = [t.target for t in node.targets] if isinstance(node, cst.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, cst.Name):
                        self.condition_vars.setdefault(target.value, []).extend(value_hits)
        for child in children(node):
            self._find_condition_vars(child)

    def _block_body(self, statements: list[cst.CSTNode]) -> list[Hit]:
        """Statements in order; a run of consecutive ifs that names another platform is one dispatch."""
        found: list[Hit] = []
        at = 0
        while at < len(statements):
            end = at
            while end < len(statements) and isinstance(statements[end], cst.If):
                end += 1
            run = statements[at:end]
            if len(run) > 1 and (self.around is None or any(s in self.around for s in run)) and \
                    any(self._names_other(s.test) for s in run if isinstance(s, cst.If)):
                branches = [b for s in run if isinstance(s, cst.If) for b in _if_chain(s)[0]]
                found += self._chain(branches, None)
                for statement in run:  # their else blocks, if any
                    orelse = _if_chain(statement)[1] if isinstance(statement, cst.If) else None
                    found += self._collect(orelse) if orelse is not None else []
                at = end
                continue
            found += self._collect(statements[at])
            at += 1
        return found

    def _unit(self, test: cst.BaseExpression, test_hits: list[Hit], guarded: list[Hit]) -> list[Hit]:
        region = test_hits + guarded
        read = sorted(n for n in _names(test) if n in self.condition_vars)
        held = [h for n in read for h in self.condition_vars[n] if id(h) not in self.dropped]
        if not any(h.rule.condition for h in test_hits + held):
            return region
        accepted = {id(h) for h in test_hits}
        stuck = next((h for h in held + region if not self._rewritable(h, accepted)), None)
        if stuck is None:
            self.in_test |= {id(h) for h in test_hits if h.fix is not None}
            return region
        code = _short(self.module.code_for_node(test))
        if any(stuck is h for h in held):
            name = next(n for n in read if any(stuck is h for h in self.condition_vars[n]))
            why = f"`{name}`, which it reads, is not rewritten"
        else:
            why = f"{stuck.subject or stuck.rule.name} ({stuck.rule.id}) has no rewrite"
        for name in _names(test):
            self.kept_tests.setdefault(name, (code, why))
        reason = f"not rewritten: the test `{code}` and what it guards are rewritten together or not at all, and {why}"
        for hit in region:
            if hit.fix is not None:
                self._block(hit, reason)
        return region

    def _rewritable(self, hit: Hit, accepted: set[int]) -> bool:
        if hit.severity == "portable" or hit.rule.inert:
            return True
        if hit.fix is None:
            return False
        return hit.fix.get("kind") != "accelerator-test" or id(hit) in accepted or id(hit) in self.in_test

    def _match(self, node: cst.Match) -> list[Hit]:
        found = self._collect(node.subject)
        dispatch = any(self._names_other(case.pattern) for case in node.cases)
        for case in node.cases:
            pattern_hits = self._collect(case.pattern)
            body_hits = self._collect(case.body) + (self._collect(case.guard) if case.guard is not None else [])
            if dispatch and pattern_hits:
                self._drop(pattern_hits + body_hits)
            else:
                found += pattern_hits + body_hits
        return found

    # ---------------------------------------------------------------- tables
    def _table(self, node: cst.Dict) -> None:
        keys = [(e, string_value(e.key)) for e in node.elements
                if isinstance(e, cst.DictElement) and isinstance(e.key, cst.SimpleString)]
        devices = {(v or "").split(":")[0] for _, v in keys}
        if self.device not in devices:
            return
        handles_others = bool(devices & self.others)
        for element, value in keys:
            if (value or "").split(":")[0] != self.device:
                continue
            self._drop(self._under(element.value))
            if handles_others:
                self._drop(self.by_node.get(element.key, []))

    def _sequence(self, node: cst.Tuple | cst.List | cst.Set) -> None:
        values = [(e.value, string_value(e.value)) for e in node.elements if isinstance(e.value, cst.SimpleString)]
        if any((v or "").split(":")[0] in self.others for _, v in values):
            for element, _ in values:
                self._drop(self.by_node.get(element, []))

    # ---------------------------------------------------------------- helpers
    def _names_other(self, node: cst.CSTNode) -> bool:
        """Does this expression name another platform ("npu", torch.npu, is_npu, "hccl", ...)?"""
        if isinstance(node, cst.SimpleString):
            return (string_value(node) or "").split(":")[0] in self.others
        if isinstance(node, cst.Name):
            return node.value in self.others
        if isinstance(node, cst.Attribute) and node.attr.value in self.others:
            return True
        return any(self._names_other(child) for child in children(node))

    def _under(self, node: cst.CSTNode) -> list[Hit]:
        if self.around is not None and node not in self.around:
            return []
        return [*self.by_node.get(node, ()), *(h for child in children(node) for h in self._under(child))]

    def _drop(self, hits: list[Hit]) -> None:
        self.dropped |= {id(h) for h in hits}

    @staticmethod
    def _block(hit: Hit, reason: str) -> None:
        hit.fix, hit.severity, hit.note = None, "manual", reason


def _short(code: str) -> str:
    code = " ".join(code.split())
    return code if len(code) <= 60 else code[:57] + "..."


def _names(node: cst.CSTNode) -> set[str]:
    if isinstance(node, cst.Name):
        return {node.value}
    return {n for child in children(node) for n in _names(child)}


def _if_chain(node: cst.If) -> tuple[list[tuple[cst.BaseExpression, cst.CSTNode]], cst.CSTNode | None]:
    branches: list[tuple[cst.BaseExpression, cst.CSTNode]] = []
    current: cst.CSTNode | None = node
    while isinstance(current, cst.If):
        branches.append((current.test, current.body))
        current = current.orelse
    return branches, current.body if isinstance(current, cst.Else) else None


def _ifexp_chain(node: cst.IfExp) -> tuple[list[tuple[cst.BaseExpression, cst.CSTNode]], cst.CSTNode | None]:
    branches: list[tuple[cst.BaseExpression, cst.CSTNode]] = []
    current: cst.BaseExpression = node
    while isinstance(current, cst.IfExp):
        branches.append((current.test, current.body))
        current = current.orelse
    return branches, current
