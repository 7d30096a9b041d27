"""The rules table: loaded from rules.toml (data), validated, selected by id / name / id prefix."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from polytrain.errors import ConfigError, closest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEVERITIES = ("portable", "auto-fix", "manual", "blocker")  # in increasing order of trouble
KINDS = ("qualname", "import", "method", "attribute", "string", "call-kwargs", "call-sources", "index", "shell",
         "file")
CONTEXTS = ("torch.device", "device", "backend", "compare", "key", "any")
FIX_KINDS = ("call", "device-module", "name", "amp", "amp-decorator", "to-device", "torch-device", "device-string",
             "device-type-string", "backend", "drop-kwargs", "legacy-tensor", "device-index", "accelerator-test",
             "rename-method", "rename")
REGEX_KINDS = ("string", "shell", "index")
PARSE_ERROR_ID = "PA000"


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    kind: str
    match: tuple[str, ...]
    severity: str
    message: str
    replacement: str
    triggers: tuple[str, ...] = ()
    ascend: str = ""
    context: str = "any"
    kwargs: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    whole_word: bool = False
    condition: bool = False
    inert: bool = False
    fix: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    target_fix: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def fixable(self) -> bool:
        return bool(self.fix)

    def fix_for(self, target: str | None) -> dict[str, Any]:
        """The rewrite under `--fix` (target None) or `--fix --target <target>`; empty: none."""
        if target is not None and target in self.target_fix:
            return self.target_fix[target]
        return self.fix


@dataclass(frozen=True)
class Target:
    """How Ascend-only (or other single-platform) code spells things: `--fix --target <name>` ([target.<name>])."""

    name: str
    device: str  # device type string ("npu")
    backend: str  # process-group backend ("hccl")
    module: str  # the device module (torch.npu)
    package: str  # the package that registers the device (torch_npu), imported by the rewritten file


PARSE_ERROR = Rule(PARSE_ERROR_ID, "not-parsed", "file", (), "manual",
                   "the file could not be read or parsed, so it was not audited", "fix the syntax error / encoding")
FIX_REFUSED = Rule("PA001", "fix-not-applied", "file", (), "manual",
                   "--fix left this file unchanged: the rewrite would have broken it",
                   "apply the auto-fix findings of this file by hand (the check that refused names what broke)")


@dataclass(frozen=True)
class RuleSet:
    """All rules plus the source platform's device and backend names and the --target choices ([platform])."""

    rules: tuple[Rule, ...]
    device: str
    backend: str
    targets: tuple[str, ...] = ()
    others: tuple[str, ...] = ()  # names of other platforms' devices / backends / modules ([platform] others)
    spellings: tuple[Target, ...] = ()
    index_names: tuple[str, ...] = ()  # regexes of variable names that hold a device index (the `index` rules')

    def target(self, name: str | None) -> Target | None:
        return next((t for t in self.spellings if t.name == name), None) if name else None

    def with_rules(self, rules: tuple[Rule, ...]) -> RuleSet:
        return RuleSet(rules, self.device, self.backend, self.targets, self.others, self.spellings, self.index_names)

    def by_id(self) -> dict[str, Rule]:
        return {rule.id: rule for rule in (*self.rules, PARSE_ERROR, FIX_REFUSED)}

    def select(self, select: list[str] | None = None, ignore: list[str] | None = None) -> RuleSet:
        """Keep rules named in `select` (all when empty) minus those in `ignore`; each entry is an id, an id prefix
        (PA1 = every PA1xx rule) or a rule name. An entry that names no rule is a ConfigError."""
        chosen = [r for r in self.rules if not select or any(self._names(r, s) for s in select)]
        chosen = [r for r in chosen if not any(self._names(r, s) for s in ignore or [])]
        for entry in [*(select or []), *(ignore or [])]:
            if not any(self._names(r, entry) for r in self.rules):
                names = [r.id for r in self.rules] + [r.name for r in self.rules]
                raise ConfigError(f"unknown rule `{entry}`{closest(entry, names)}: give a rule id (PA101), an id "
                                  "prefix (PA1) or a name (dot-cuda); `polytrain audit --list-rules` lists them")
        return self.with_rules(tuple(chosen))

    @staticmethod
    def _names(rule: Rule, entry: str) -> bool:
        entry = entry.strip()
        return bool(entry) and (rule.id.upper().startswith(entry.upper()) or rule.name == entry)

    def trigger_pattern(self) -> re.Pattern[bytes] | None:
        """One case-insensitive regex of every selected rule's triggers, or None when a rule has none (file rules
        have none: they match by suffix)."""
        words = sorted({(t, r.whole_word) for r in self.rules if r.kind not in ("file",) for t in r.triggers})
        if not words:
            return None
        alternatives = [rf"(?<![A-Za-z0-9_]){re.escape(w)}(?![A-Za-z0-9_])" if whole else re.escape(w)
                        for w, whole in words]
        return re.compile("|".join(alternatives).encode(), re.IGNORECASE)


def _as_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: expected a list of strings")
    return tuple(value)


def parse_rules(data: dict[str, Any]) -> RuleSet:
    """Build and check a RuleSet from the TOML table (raises ValueError naming the bad rule)."""
    platform = data.get("platform", {})
    rules, seen = [], set()
    for entry in data.get("rule", []):
        where = f"rule {entry.get('id', '?')}"
        unknown = set(entry) - {f.name for f in Rule.__dataclass_fields__.values()}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        rule = Rule(id=entry["id"], name=entry["name"], kind=entry["kind"], match=_as_tuple(entry["match"], where),
                    severity=entry["severity"], message=entry["message"], replacement=entry["replacement"],
                    triggers=_as_tuple(entry.get("triggers"), where), ascend=entry.get("ascend", ""),
                    context=entry.get("context", "any"), kwargs=_as_tuple(entry.get("kwargs"), where),
                    sources=_as_tuple(entry.get("sources"), where), whole_word=bool(entry.get("whole_word", False)),
                    condition=bool(entry.get("condition", False)), inert=bool(entry.get("inert", False)),
                    fix=dict(entry.get("fix", {})),
                    target_fix={k: dict(v) for k, v in entry.get("target_fix", {}).items()})
        if rule.id in seen or rule.name in seen:
            raise ValueError(f"{where}: duplicate id or name")
        seen |= {rule.id, rule.name}
        if rule.kind not in KINDS or rule.severity not in SEVERITIES or rule.context not in CONTEXTS:
            raise ValueError(f"{where}: kind, severity or context not one of {KINDS} / {SEVERITIES} / {CONTEXTS}")
        if (rule.severity == "auto-fix") != rule.fixable or (rule.fix and rule.fix.get("kind") not in FIX_KINDS):
            raise ValueError(f"{where}: auto-fix rules, and only they, have a fix with a kind in {FIX_KINDS}")
        for name, target_fix in rule.target_fix.items():
            if name not in platform.get("targets", ()) or target_fix.get("kind") not in FIX_KINDS:
                raise ValueError(f"{where}: target_fix.{name}: the target must be in [platform] targets and the "
                                 f"kind in {FIX_KINDS}")
        if rule.kind != "file" and not rule.triggers:
            raise ValueError(f"{where}: no triggers (the text pre-filter would skip every file it can match)")
        if rule.kind in ("qualname", "import", "method", "attribute", "call-kwargs", "call-sources"):
            # Sound pre-filter: any use of a dotted name spells every one of its parts in the file (in the import or
            # in the attribute chain), so one trigger inside each pattern is enough.
            for pattern in rule.match:
                parts = pattern.lower().split(".") if rule.whole_word else [pattern.lower()]
                if not any(t.lower() == p or (not rule.whole_word and t.lower() in p)
                           for t in rule.triggers for p in parts):
                    raise ValueError(f"{where}: pattern {pattern!r} contains none of the triggers {rule.triggers}"
                                     + (" as a whole part" if rule.whole_word else ""))
        elif rule.whole_word:
            raise ValueError(f"{where}: whole_word is only for rules that match dotted names")
        for pattern in rule.match if rule.kind in REGEX_KINDS else ():
            re.compile(pattern)
        rules.append(rule)
    if not {"device", "backend", "targets"} <= set(platform):
        raise ValueError("[platform] needs device, backend and targets")
    spellings = []
    for name in platform["targets"]:
        table = data.get("target", {}).get(name)
        if table is None:  # hints (`ascend`) only: `--fix --target <name>` is refused
            continue
        if not {"device", "backend", "module", "import"} <= set(table):
            raise ValueError(f"[target.{name}] needs device, backend, module and import")
        spellings.append(Target(name, table["device"], table["backend"], table["module"], table["import"]))
    return RuleSet(tuple(rules), platform["device"], platform["backend"], tuple(platform["targets"]),
                   _as_tuple(platform.get("others"), "[platform] others"), tuple(spellings),
                   tuple(p for r in rules if r.kind == "index" for p in r.match))


@lru_cache(maxsize=1)
def load_rules() -> RuleSet:
    """The shipped rules table (polytrain/audit/rules.toml)."""
    text = resources.files("polytrain.audit").joinpath("rules.toml").read_text(encoding="utf-8")
    return parse_rules(tomllib.loads(text))
