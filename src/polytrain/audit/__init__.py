"""Migration auditor: find NVIDIA-only code, rate it, and rewrite what can be made portable (`polytrain audit`).

rules.toml  the rules table (data): what each rule matches, its severity, message and replacement
scanner.py  libcst visitor: resolves names through imports and aliases and records the matches
fixer.py    libcst transformer: the auto-fix rewrites, formatting kept
engine.py   files, text pre-filter, worker processes, findings
report.py   text / JSON / SARIF reports and the --diff output
cli.py      the `polytrain audit` command
"""

from polytrain.audit.engine import AuditResult, Finding, audit_paths, audit_python, write_fixes
from polytrain.audit.rules import Rule, RuleSet, load_rules

__all__ = ["AuditResult", "Finding", "Rule", "RuleSet", "audit_paths", "audit_python", "load_rules", "write_fixes"]
