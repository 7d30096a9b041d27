"""Migration auditor: find NVIDIA-only code, rate it, and rewrite what can be made portable (`polytrain audit`).

rules.toml  the rules table (data): what each rule matches, its severity, message and replacement
walk.py     a fast read-only walk over a libcst tree
scanner.py  libcst visitor: resolves names through imports and aliases and records the matches
strings.py  what a string literal means where it sits (device, backend, comparison, table key, config value)
guards.py   conditions rewritten with what they guard or not at all; per-device dispatch left alone
fixer.py    libcst transformer: the auto-fix rewrites, formatting kept
spelling.py how the rewrites spell the device, device i, the backend and device tests (agnostic or --target)
names.py    the name-resolution check every rewritten file passes before it is kept
positions.py  line / column of the reported nodes only (cheaper than libcst's PositionProvider)
engine.py   files, text pre-filter, worker processes, findings, writing the fixes
report.py   text / JSON / SARIF reports and the --diff output
cli.py      the `polytrain audit` command
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {"AuditResult": "engine", "Finding": "engine", "audit_paths": "engine", "audit_python": "engine",
            "write_fixes": "engine", "Rule": "rules", "RuleSet": "rules", "load_rules": "rules"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imported on first use: `polytrain --help` and the other commands do not pay for importing libcst."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"polytrain.audit.{_EXPORTS[name]}"), name)
