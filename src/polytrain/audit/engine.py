"""Audit files: find them, pre-filter them, scan (and fix) each in a worker process, collect the findings.

Pre-filter: a file whose text contains none of the selected rules' trigger words (`cuda`, `nccl`, `flash_attn`,
...; see rules.toml) cannot match any rule, since every name, import and string a rule matches spells one of them.
Such a file is counted as scanned (files, lines) without a libcst parse. `--no-prefilter` parses everything; the
tests check both give the same findings.

With `fix`, a rewritten file is checked before it is kept: it must compile and read no name that nothing binds where
the original read none (names.py); otherwise the file is left unchanged and reported (PA001). The findings still open
are those of the rewritten text, at its line numbers (`FileResult.remaining`); `write_fixes` writes each file whole
(a temporary file renamed over it), after checking that every file can be written and is unchanged since it was read.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import libcst as cst

from polytrain.audit.fixer import Fixer
from polytrain.audit.guards import Guards
from polytrain.audit.names import names_gained
from polytrain.audit.positions import node_positions
from polytrain.audit.rules import FIX_REFUSED, PARSE_ERROR, SEVERITIES, Rule, RuleSet, load_rules
from polytrain.audit.scanner import Hit, Scanner
from polytrain.errors import PolytrainError

PYTHON_SUFFIXES = (".py", ".pyi")
SHELL_SUFFIXES = (".sh", ".bash")
SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "venv"}
SERIAL_BELOW = 8  # files: fewer than this are scanned in this process (a pool costs more than it saves)


@dataclass
class Finding:
    rule: str
    name: str
    severity: str
    path: str
    line: int
    col: int
    end_line: int
    end_col: int
    message: str
    replacement: str
    ascend: str = ""
    note: str = ""
    subject: str = ""
    fixed: bool = False

    def as_dict(self, target: str | None) -> dict:
        data = asdict(self)
        if not target:
            data.pop("ascend")
        return data


@dataclass
class FileResult:
    path: str
    lines: int = 0
    parsed: bool = False  # False: skipped by the pre-filter (or not Python)
    findings: list[Finding] = field(default_factory=list)
    original: bytes | None = None  # set with new_source when a fix changed the file
    new_source: bytes | None = None
    remaining: list[Finding] | None = None  # with new_source: the open findings of the new text, at its lines

    def as_written(self) -> FileResult:
        """This file as --fix leaves it: the fixed findings (at the original lines) and the new text's open ones."""
        if self.remaining is None:
            return self
        findings = [f for f in self.findings if f.fixed] + self.remaining
        return FileResult(self.path, line_count(self.new_source or b""), self.parsed,
                          findings, self.original, self.new_source, None)


@dataclass
class AuditResult:
    files: list[FileResult]

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.files for f in r.findings]

    def as_written(self) -> AuditResult:
        """The result as --fix leaves the files: open findings at the rewritten files' line numbers."""
        return AuditResult([f.as_written() for f in self.files])

    def counts(self) -> dict[str, int]:
        open_findings = [f for f in self.findings if not f.fixed]
        counts = {s: sum(f.severity == s for f in open_findings) for s in SEVERITIES}
        counts["fixed"] = sum(f.fixed for f in self.findings)
        counts["files"] = len(self.files)
        counts["lines"] = sum(r.lines for r in self.files)
        counts["parsed"] = sum(r.parsed for r in self.files)
        counts["not_parsed"] = sum(f.rule == PARSE_ERROR.id for f in self.findings)
        counts["files_with_findings"] = sum(any(not f.fixed for f in r.findings) for r in self.files)
        counts["files_changed"] = sum(r.new_source is not None for r in self.files)
        return counts


def line_count(source: bytes) -> int:
    return source.count(b"\n") + (not source.endswith(b"\n") and bool(source))


def _finding(rule: Rule, path: str, start: tuple[int, int], end: tuple[int, int], severity: str | None = None,
             note: str = "", message: str | None = None, subject: str = "") -> Finding:
    replacement, ascend = rule.replacement, rule.ascend
    if subject and "<name>" in replacement + ascend:  # torch.accelerator.<name>() -> ...memory_allocated()
        name = subject.rsplit(".", 1)[-1]
        replacement, ascend = replacement.replace("<name>", name), ascend.replace("<name>", name)
    return Finding(rule.id, rule.name, severity or rule.severity, path, start[0], start[1], end[0], end[1],
                   message or rule.message, replacement, ascend, note, subject)


def scan(module: cst.Module, rules: RuleSet, target: str | None = None) -> Scanner:
    """The hits of one module: matched (scanner.py), then decided around conditions and dispatch (guards.py)."""
    scanner = Scanner(rules, module, target).scan()
    scanner.hits = Guards(scanner).resolve()
    return scanner


def audit_python(source: bytes, path: str, rules: RuleSet, fix: bool = False, prefilter: bool = True,
                 target: str | None = None) -> FileResult:
    """Findings of one Python file; with `fix`, also its rewritten source (when anything changed and the rewrite
    passed its check). `target` ("npu"): Ascend-only rewrites and severities."""
    result = FileResult(path, lines=line_count(source))
    pattern = _trigger_pattern(rules, "python") if prefilter else None
    if prefilter and (pattern is None or not pattern.search(source)):
        return result
    result.parsed = True
    try:
        module = cst.parse_module(source)
    except (cst.ParserSyntaxError, UnicodeDecodeError, LookupError, SyntaxError) as err:
        line, col = getattr(err, "raw_line", 1) or 1, getattr(err, "raw_column", 0) + 1
        reason = getattr(err, "message", "") or str(err).strip().split("\n")[0] or type(err).__name__
        try:  # Python's own parser names the line a person would fix (libcst's may be the next token's)
            ast.parse(source)
        except SyntaxError as python_err:
            line, col = python_err.lineno or line, python_err.offset or col
            reason = f"syntax error: {python_err.msg}"
        except (ValueError, UnicodeDecodeError):
            pass
        result.findings.append(_finding(PARSE_ERROR, path, (line, col), (line, col),
                                        message=f"not parsed, so not audited: {reason}"))
        return result
    scanner = scan(module, rules, target)
    if not scanner.hits:
        return result
    done: set[int] = set()
    refused = ""
    if fix and any(h.fix is not None for h in scanner.hits):
        new_module, applied = Fixer(scanner, rules.target(target)).apply(module, scanner.hits)
        new_code = new_module.bytes
        if new_code != source:
            refused = _check_rewrite(source, new_code)
            if not refused:
                result.original, result.new_source = source, new_code
                done = {id(h) for h in applied}
                result.remaining = audit_python(new_code, path, rules, prefilter=False, target=target).findings
    _add_findings(result, module, scanner.hits, done, refused)
    return result


def _check_rewrite(source: bytes, new_code: bytes) -> str:
    """Why the rewrite may not be kept ("" when it may): it must compile and read no name unbound that the
    original read bound."""
    try:
        cst.parse_module(new_code)
        gained = names_gained(source, new_code)
    except SyntaxError as err:  # the original or the rewrite does not compile with this Python
        which = "the rewrite" if _compiles(source) else "the original"
        return f"{FIX_REFUSED.message}: {which} does not compile with this Python ({err.msg}), so it was not checked"
    except cst.ParserSyntaxError as err:
        return f"{FIX_REFUSED.message}: the rewrite does not parse ({err.message})"
    if gained:
        names = ", ".join(f"`{n}`" for n in gained)
        return f"{FIX_REFUSED.message}: it would read {names} where nothing binds it (NameError)"
    return ""


def _compiles(source: bytes) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def _add_findings(result: FileResult, module: cst.Module, hits: list[Hit], done: set[int], refused: str) -> None:
    path = result.path
    positions = node_positions(module, [h.node for h in hits])
    if refused:
        first = min((positions[h.node] for h in hits if h.fix is not None), default=(1, 0, 1, 0))
        result.findings.append(_finding(FIX_REFUSED, path, (first[0], first[1] + 1), (first[0], first[1] + 1),
                                        message=refused))
    for hit in hits:
        line, col, end_line, end_col = positions[hit.node]
        severity, note = hit.severity, hit.note
        if refused and hit.fix is not None:
            severity, note = "manual", f"not rewritten: --fix left this file unchanged ({FIX_REFUSED.id})"
        finding = _finding(hit.rule, path, (line, col + 1), (end_line, end_col + 1), severity, note,
                           subject=hit.subject)
        finding.fixed = id(hit) in done
        result.findings.append(finding)
    result.findings.sort(key=lambda f: (f.line, f.col, f.rule))


def audit_cuda_source(source: bytes, path: str, rules: RuleSet) -> FileResult:
    result = FileResult(path, lines=source.count(b"\n"), parsed=True)
    for rule in rules.rules:
        if rule.kind == "file" and path.endswith(rule.match):
            kernels = len(re.findall(rb"__global__", source))
            message = f"{rule.message} ({kernels} __global__ kernel{'s' * (kernels != 1)})"
            result.findings.append(_finding(rule, path, (1, 1), (1, 1), message=message))
    return result


def audit_shell(source: bytes, path: str, rules: RuleSet) -> FileResult:
    result = FileResult(path, lines=source.count(b"\n"), parsed=True)
    shell_rules = [(rule, [re.compile(p) for p in rule.match]) for rule in rules.rules if rule.kind == "shell"]
    for number, line in enumerate(source.decode("utf-8", "replace").splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#!") else ""
        for rule, patterns in shell_rules:
            for pattern in patterns:
                for match in pattern.finditer(code):
                    result.findings.append(_finding(rule, path, (number, match.start() + 1),
                                                    (number, match.end() + 1),
                                                    subject=match.group(0)))
    return result


@lru_cache(maxsize=4)
def _trigger_pattern(rules: RuleSet, kind: str) -> re.Pattern[bytes] | None:
    chosen = [r for r in rules.rules if (r.kind == "shell") == (kind == "shell") and r.kind != "file"]
    return rules.with_rules(tuple(chosen)).trigger_pattern()


def audit_file(path: str, rules: RuleSet, fix: bool = False, prefilter: bool = True,
               target: str | None = None) -> FileResult:
    try:
        source = Path(path).read_bytes()
    except OSError as err:
        result = FileResult(path)
        result.findings.append(_finding(PARSE_ERROR, path, (1, 1), (1, 1),
                                        message=f"not read, so not audited: {err.strerror or err}"))
        return result
    if path.endswith(SHELL_SUFFIXES):
        return audit_shell(source, path, rules)
    if any(r.kind == "file" and path.endswith(r.match) for r in rules.rules):
        return audit_cuda_source(source, path, rules)
    return audit_python(source, path, rules, fix, prefilter, target)


def find_files(paths: Sequence[str], rules: RuleSet) -> list[str]:
    """Files to audit under `paths` (a file given by name is audited whatever its suffix)."""
    suffixes = PYTHON_SUFFIXES + SHELL_SUFFIXES + tuple(s for r in rules.rules if r.kind == "file" for s in r.match)
    found: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_file():
            if not os.access(path, os.R_OK):
                raise PolytrainError(f"cannot read {given}: permission denied")
            found.append(str(path))
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
                found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes))
        else:
            raise PolytrainError(f"no such file or directory: {given}")
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- parallel
def _worker(job: tuple[list[str], tuple[str, ...], bool, bool, str | None]) -> list[FileResult]:
    paths, rule_ids, fix, prefilter, target = job
    rules = _selected(rule_ids)
    return [audit_file(p, rules, fix, prefilter, target) for p in paths]


@lru_cache(maxsize=8)
def _selected(rule_ids: tuple[str, ...]) -> RuleSet:
    every = load_rules()
    return every.with_rules(tuple(r for r in every.rules if r.id in set(rule_ids)))


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def audit_paths(paths: Sequence[str], rules: RuleSet | None = None, fix: bool = False, jobs: int | None = None,
                prefilter: bool = True, target: str | None = None) -> AuditResult:
    """Audit every file under `paths` with `rules` (default: all shipped rules), `jobs` worker processes
    (default: the CPUs this process may use; below SERIAL_BELOW files, this process). Worker processes load the
    shipped rules and keep those with the ids of `rules`. Fixed sources are returned, not written (write_fixes).
    `target` ("npu"): severities and rewrites for Ascend-only code."""
    rules = rules or load_rules()
    if fix and target is not None and rules.target(target) is None:
        raise PolytrainError(f"--fix --target {target}: rules.toml has no [target.{target}] table of spellings")
    files = find_files(paths, rules)
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs <= 1 or len(files) < SERIAL_BELOW:
        return AuditResult([audit_file(p, rules, fix, prefilter, target) for p in files])
    rule_ids = tuple(r.id for r in rules.rules)
    size = max(1, min(32, len(files) // (jobs * 4)))
    work = [(batch, rule_ids, fix, prefilter, target) for batch in _batches(files, size)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = [r for batch in pool.map(_worker, work) for r in batch]
    return AuditResult(results)


def write_fixes(result: AuditResult) -> list[str]:
    """Write every rewritten file in place; returns their paths. Nothing is written unless every file can be: each
    must be unchanged since it was read and writable (it and its directory); each is then written whole to a
    temporary file beside it, with its permissions, and renamed over it."""
    changed = [f for f in result.files if f.new_source is not None]
    for file in changed:
        path = Path(file.path)
        try:
            current = path.read_bytes()
        except OSError as err:
            raise PolytrainError(f"cannot read {file.path} again: {err.strerror}; nothing was written") from err
        if current != file.original:
            raise PolytrainError(f"{file.path} changed while it was audited; nothing was written (run again)")
        if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
            raise PolytrainError(f"cannot write {file.path} (or a file beside it): permission denied; nothing was "
                                 "written")
    written = []
    for file in changed:
        path = Path(file.path)
        temporary = path.with_name(f".{path.name}.polytrain-fix")
        try:
            temporary.write_bytes(file.new_source or b"")
            os.chmod(temporary, path.stat().st_mode & 0o7777)
            os.replace(temporary, path)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            done = f"; already rewritten: {', '.join(written)}" if written else "; nothing was written"
            raise PolytrainError(f"cannot write {file.path}: {err.strerror}{done}") from err
        written.append(file.path)
    return written
