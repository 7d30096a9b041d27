"""Reports of an audit: text for people (grouped by severity), JSON for scripts, SARIF 2.1.0 for code review."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from polytrain import __version__
from polytrain.audit.engine import AuditResult, Finding
from polytrain.audit.rules import PARSE_ERROR, SEVERITIES, RuleSet

ORDER = tuple(reversed(SEVERITIES))  # blocker first
HEADINGS = {
    "blocker": "no equivalent off NVIDIA: needs a rewrite or a kernel of its own",
    "manual": "a replacement exists; a person applies it",
    "auto-fix": "mechanical: `polytrain audit --fix` rewrites these",
    "portable": "works as is (hygiene, or a guarded optional import)",
}
SARIF_LEVEL = {"blocker": "error", "manual": "warning", "auto-fix": "warning", "portable": "note"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def summary_line(result: AuditResult) -> str:
    counts = result.counts()
    plural = "s" if counts["blocker"] != 1 else ""
    line = (f"{counts['blocker']} blocker{plural}, {counts['manual']} manual, {counts['auto-fix']} auto-fixable, "
            f"{counts['portable']} portable in {counts['files_with_findings']} of {counts['files']} files "
            f"({counts['lines']:,} lines; {counts['parsed']} parsed, the rest had no trigger word")
    if counts["not_parsed"]:
        line += f"; {counts['not_parsed']} could not be parsed"
    line += ")"
    if counts["fixed"]:
        line += f"; fixed {counts['fixed']} in {counts['files_changed']} files"
    return line


def text_report(result: AuditResult, target: str | None = None) -> str:
    lines = []
    open_findings = [f for f in result.findings if not f.fixed]
    for severity in ORDER:
        group = sorted((f for f in open_findings if f.severity == severity), key=lambda f: (f.path, f.line, f.col))
        if not group:
            continue
        lines.append(f"{severity} ({len(group)}): {HEADINGS[severity]}")
        for finding in group:
            subject = f"{finding.subject}: " if finding.subject else ""
            lines.append(f"  {finding.path}:{finding.line}:{finding.col}: {finding.rule} {subject}{finding.message}")
            if finding.note:
                lines.append(f"      note: {finding.note}")
            lines.append(f"      -> {finding.replacement}")
            if target and finding.ascend:
                lines.append(f"      Ascend: {finding.ascend}")
        lines.append("")
    fixed = [f for f in result.findings if f.fixed]
    if fixed:
        files = sorted({f.path for f in fixed})
        lines.append(f"fixed ({len(fixed)}): rewritten in {', '.join(files)}")
        lines.append("")
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def json_report(result: AuditResult, target: str | None = None) -> str:
    counts = result.counts()
    return json.dumps({
        "tool": "polytrain audit", "version": __version__, "target": target,
        "summary": counts,
        "findings": [f.as_dict(target) for f in result.findings if not f.fixed],
        "fixed": [f.as_dict(target) for f in result.findings if f.fixed],
    }, indent=2) + "\n"


def sarif_report(result: AuditResult, rules: RuleSet, target: str | None = None) -> str:
    """SARIF 2.1.0: one run, the rules that fired as reportingDescriptors, one result per open finding."""
    open_findings = [f for f in result.findings if not f.fixed]
    by_id = rules.by_id()
    fired = sorted({f.rule for f in open_findings})
    index = {rule_id: i for i, rule_id in enumerate(fired)}
    descriptors = []
    for rule_id in fired:
        rule = by_id.get(rule_id, PARSE_ERROR)
        help_text = rule.replacement + (f" (Ascend: {rule.ascend})" if target and rule.ascend else "")
        descriptors.append({
            "id": rule.id, "name": rule.name,
            "shortDescription": {"text": rule.message},
            "help": {"text": help_text},
            "defaultConfiguration": {"level": SARIF_LEVEL[rule.severity]},
            "properties": {"severity": rule.severity, "kind": rule.kind},
        })
    return json.dumps({
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "polytrain-audit", "version": __version__, "rules": descriptors}},
            "originalUriBaseIds": {"SRCROOT": {"uri": Path.cwd().as_uri() + "/"}},
            "columnKind": "unicodeCodePoints",
            "results": [_sarif_result(f, index[f.rule], target) for f in open_findings],
        }],
    }, indent=2) + "\n"


def _sarif_result(finding: Finding, rule_index: int, target: str | None) -> dict:
    path = Path(finding.path)
    if path.is_absolute():
        location = {"uri": path.as_uri()}
    else:
        location = {"uri": path.as_posix(), "uriBaseId": "SRCROOT"}
    subject = f"{finding.subject}: " if finding.subject else ""
    text = f"{subject}{finding.message}. Replacement: {finding.replacement}"
    if target and finding.ascend:
        text += f". Ascend: {finding.ascend}"
    if finding.note:
        text += f" ({finding.note})"
    return {
        "ruleId": finding.rule, "ruleIndex": rule_index, "level": SARIF_LEVEL[finding.severity],
        "message": {"text": text},
        "locations": [{"physicalLocation": {
            "artifactLocation": location,
            "region": {"startLine": finding.line, "startColumn": finding.col,
                       "endLine": finding.end_line, "endColumn": finding.end_col}}}],
        "properties": {"severity": finding.severity},
    }


def unified_diff(result: AuditResult) -> str:
    out = []
    for file in result.files:
        if file.new_source is None or file.original is None:
            continue
        old = file.original.decode("utf-8", "replace").splitlines(keepends=True)
        new = file.new_source.decode("utf-8", "replace").splitlines(keepends=True)
        name = Path(file.path).as_posix()
        before, after = (name, name) if Path(name).is_absolute() else (f"a/{name}", f"b/{name}")
        out.extend(difflib.unified_diff(old, new, before, after))
    return "".join(out)


def rules_table(rules: RuleSet) -> str:
    lines = [f"{'id':6} {'severity':9} {'name':26} matches"]
    for rule in rules.rules:
        shown = ", ".join(rule.match)
        if len(shown) > 70:
            shown = shown[:67] + "..."
        lines.append(f"{rule.id:6} {rule.severity:9} {rule.name:26} {rule.kind}: {shown}")
    return "\n".join(lines) + "\n"
