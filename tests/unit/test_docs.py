"""The documentation stays true to the code: every polytrain command shown in README.md and docs/ parses (its verb
takes its flags, every `--set` names a real config key), every script or test path it names exists, and every
relative link resolves."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"<|\.\.\.|\||\b[A-Z][A-Z_]*\b")


def fenced_commands(text: str) -> list[str]:
    lines = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip().removeprefix("$ ") for line in joined.splitlines()]
    return [line for line in lines if is_command(line)]


def inline_commands(text: str) -> list[str]:
    spans = [" ".join(span.split()) for span in INLINE.findall(FENCE.sub("", text))]
    return [span for span in spans if is_command(span) and not PLACEHOLDER.search(span)]


def is_command(line: str) -> bool:
    return bool(re.match(r"(\S*/)?polytrain\s", line) or " -m polytrain " in line or re.match(r"python3? \S+\.py", line)
                or line.startswith(("python -m pytest", ".venv/bin/python -m pytest")))


def polytrain_argv(line: str) -> list[str] | None:
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word.endswith("polytrain") and (i == 0 or words[i - 1] == "-m"):
            return words[i + 1 :]
    return None


def commands() -> list[tuple[str, str, bool]]:
    """(page, command, whether it is a whole command: fenced blocks hold whole commands, inline code in prose may
    name a verb and some of its flags)."""
    out = []
    for page in PAGES:
        text = page.read_text()
        out += [(page.name, line, True) for line in fenced_commands(text)]
        out += [(page.name, line, False) for line in inline_commands(text)]
    return out


def verb_parser(argv: list[str]):
    """The (sub)parser of the verb that `argv` starts with (`model info` is two words), and the rest of `argv`."""
    from polytrain.cli import build_parser

    parser = build_parser()
    while argv:
        choices = next((a.choices for a in parser._actions if getattr(a, "choices", None) and
                        isinstance(a.choices, dict)), None)
        if not choices or argv[0] not in choices:
            break
        parser, argv = choices[argv[0]], argv[1:]
    return parser, argv


def config_keys() -> set[str]:
    from polytrain.config import JobConfig
    from polytrain.models.registry import families, spec_for_architecture
    from polytrain.objectives import registry
    from polytrain.schema import describe

    keys = {row[0] for row in describe(JobConfig)}
    for family in families():
        keys |= {row[0] for row in describe(spec_for_architecture(family).config_class, "model")}
    for name in registry.names():
        section = registry.section_class(name)
        if section is not None:
            keys |= {row[0] for row in describe(section, name)}
    return keys


def test_the_pages_show_commands_at_all():
    assert sum(whole for _, _, whole in commands()) > 30


@pytest.mark.parametrize(("page", "line", "whole"), commands(),
                         ids=lambda value: value[:80] if isinstance(value, str) else "")
def test_every_command_shown_parses(page, line, whole):
    from polytrain.cli import build_parser
    from polytrain.config import parse_override

    argv = polytrain_argv(line)
    if argv is None:  # python SCRIPT.py / pytest PATHS: the files exist
        paths = [w for w in shlex.split(line, comments=True) if w.endswith(".py") or w.startswith("tests/")]
        assert paths and all((ROOT / p.split("::")[0]).exists() for p in paths), f"{page}: {line}"
        return
    if not whole:
        parser, rest = verb_parser(argv)
        assert parser.prog != "polytrain" or not argv, f"{page}: `{line}` names no verb"
        flags = [word.split("=")[0] for word in rest if word.startswith("--")]
        unknown = [flag for flag in flags if flag not in parser._option_string_actions]
        assert not unknown, f"{page}: `{line}`: {parser.prog} has no {', '.join(unknown)}"
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        assert exit.code == 0, f"{page}: `{line}` does not parse"
        return
    for override in getattr(args, "overrides", []) or []:
        key, _ = parse_override(override)
        assert key in config_keys(), f"{page}: `{line}` sets `{key}`, which is not a config key"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
