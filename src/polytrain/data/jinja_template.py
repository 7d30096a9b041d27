"""A model's own chat template: the Hugging Face Jinja `chat_template`, rendered with an exact assistant-only mask.

The text is rendered the way transformers' `apply_chat_template` renders it (a sandboxed Jinja environment with
trim_blocks / lstrip_blocks and loop controls, a `tojson` filter that keeps non-ASCII text, `raise_exception`,
`strftime_now`, and the tokenizer's named special tokens such as `bos_token` / `eos_token` as variables), so a
checkpoint is trained on exactly the format it was released with.

The trainable spans come from rendering prefixes of the conversation. For the assistant message i:

    before  = render(messages[:i])                                the context the turn follows
    opening = render(messages[:i], add_generation_prompt) - before  what generation is handed
    turn    = render(messages[:i + 1]) - before                   the turn as the template writes it

The trained span is `turn` without its leading text shared with `opening` (the assistant header): the content and
the text that closes the turn, so the model learns to stop. A template whose generation prompt goes further than its
turn header (DeepSeek-R1 opens generation with `<think>\\n` but writes past turns without it) still gets the exact
span. Every partial render must be a prefix of the whole conversation's render; a template that rewrites earlier
turns once later ones follow (e.g. one that drops the reasoning of all but the last turn when a message's content
holds it) cannot give one consistent token sequence with per-turn masks, and such a conversation is refused with a
one-line DataError. The text is then cut at the span edges and each piece is tokenised on its own, like the built-in
templates (the tokenizer recognises its special tokens in the text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError

FROM_TOKENIZER = "tokenizer"
"""`data.chat_template` value meaning: the Jinja template shipped with `data.tokenizer`."""

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens transformers hands a chat template as variables."""

_PROBE = "polytrain-probe-reply"


def is_jinja_spec(value: str) -> bool:
    """Whether a `data.chat_template` value names a Jinja template (rather than a built-in one)."""
    return value == FROM_TOKENIZER or value.endswith((".jinja", ".json"))


@dataclass(frozen=True)
class JinjaTemplate:
    """A Jinja chat template and the variables it is rendered with."""

    name: str = field(compare=False)
    """The `data.chat_template` value it was loaded from."""
    origin: str = field(compare=False)
    """Where the text was read (a file, and the field for tokenizer_config.json), for messages."""
    jinja_source: str
    """The template text, exactly as shipped."""
    variables: tuple[tuple[str, str], ...]
    """The tokenizer's named special tokens (name, text) passed to the template."""
    stop: tuple[str, ...] = ()
    """Tokens that end an assistant turn (generation stops at any of them)."""
    compiled: Any = field(default=None, compare=False, repr=False)

    def text(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's rendering of `messages`, as `apply_chat_template(..., tokenize=False)` gives it."""
        try:
            return self.compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **dict(self.variables))
        except _Refused as err:
            raise DataError(f"chat template {self.origin} refused {_describe(messages)}: {_one_line(err)}") from None
        except Exception as err:  # Jinja and the template's own expressions raise many kinds
            raise DataError(f"chat template {self.origin} failed on {_describe(messages)}: "
                            f"{type(err).__name__}: {_one_line(err)}") from None

    def segments(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered text cut into (text, trainable) pieces: assistant turns (content and turn end) trainable."""
        full = self.text(messages, add_generation_prompt)
        pieces, pos = [], 0
        for start, end in self._assistant_spans(messages, full):
            pieces += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        pieces.append((full[pos:], False))
        return [(text, trainable) for text, trainable in pieces if text]

    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.text(messages[:i])
            prompt = self.text(messages[:i], add_generation_prompt=True)
            turn = self.text(messages[: i + 1])
            if not (prompt.startswith(before) and turn.startswith(before) and full.startswith(turn)):
                raise DataError(
                    f"chat template {self.origin} renders {_describe(messages)} inconsistently: the text up to "
                    f"assistant message {i} is not a prefix of the whole conversation's (the template rewrites "
                    "earlier turns), so per-turn loss masks are impossible; split such conversations into one "
                    "sample per assistant turn"
                )
            header = _shared_prefix_len(prompt[len(before):], turn[len(before):])
            spans.append((len(before) + header, len(turn)))
        return spans


def load_jinja_template(spec: str, tokenizer: Tokenizer) -> JinjaTemplate:
    """The Jinja template `spec` names: "tokenizer" (the one next to the tokenizer: chat_template.jinja, else the
    `chat_template` field of tokenizer_config.json), a .jinja file, or a tokenizer_config.json. The special tokens
    come from the tokenizer_config.json (and special_tokens_map.json) beside a named tokenizer_config.json, else
    beside the tokenizer; the tokens that stop generation are eos_token and the token the template closes a turn
    with."""
    config_dir = Path(tokenizer.path).parent
    if spec == FROM_TOKENIZER:
        source, origin = _template_in_dir(config_dir)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"chat template file not found: {path} (`data.chat_template`)")
        if path.suffix == ".json":
            source, origin = _template_in_config(path)
            config_dir = path.parent
        else:
            source, origin = _read(path), str(path)
    variables = _special_tokens(config_dir)
    for name in ("bos_token", "eos_token"):
        value = dict(variables).get(name)
        if value and tokenizer.token_id(value) is None:
            raise DataError(f"the tokenizer config in {config_dir} names {name} {value!r}, which is not a token of "
                            f"{tokenizer.path}")
    template = JinjaTemplate(spec, origin, source, variables, compiled=_compile(source, origin))
    stop = tuple(dict.fromkeys(s for s in (dict(variables).get("eos_token"), _turn_end(template, tokenizer)) if s))
    return JinjaTemplate(spec, origin, source, variables, stop, template.compiled)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the chat template ({err})") from None


def _template_in_dir(directory: Path) -> tuple[str, str]:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _read(jinja_file), str(jinja_file)
    config = directory / "tokenizer_config.json"
    if config.is_file() and "chat_template" in _json(config):
        return _template_in_config(config)
    raise DataError(f"{directory} has no chat template (no chat_template.jinja, and no `chat_template` in "
                    "tokenizer_config.json): set `data.chat_template` to a built-in template or a .jinja file")


def _template_in_config(path: Path) -> tuple[str, str]:
    value = _json(path).get("chat_template")
    origin = f"{path} (`chat_template`)"
    if isinstance(value, str):
        return value, origin
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if isinstance(named.get("default"), str):
            return named["default"], f"{path} (`chat_template` `default`)"
        raise DataError(f"{path}: `chat_template` has no `default` template (it has {', '.join(map(str, named))}); "
                        "write the one to use to a .jinja file and set `data.chat_template` to it")
    if value is None:
        raise DataError(f"{path} has no `chat_template`: set `data.chat_template` to a built-in template or a "
                        ".jinja file")
    raise DataError(f"{path}: `chat_template` must be a string or a list of {{name, template}} objects")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _special_tokens(directory: Path) -> tuple[tuple[str, str], ...]:
    """The named special tokens of tokenizer_config.json (special_tokens_map.json fills in what it lacks); each
    may be a string or an AddedToken object with its text under "content"."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        data = _json(path) if path.is_file() else {}
        for key in SPECIAL_TOKEN_NAMES:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return tuple(found.items())


def _turn_end(template: JinjaTemplate, tokenizer: Tokenizer) -> str | None:
    """The special token that closes an assistant turn (ChatML's `<|im_end|>`), found by rendering a probe turn;
    None when the template writes no special token right after the content."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        trained = "".join(text for text, trainable in template.segments(probe) if trainable)
    except DataError:
        return None  # a template that refuses the probe reports itself on the real data
    at = trained.find(_PROBE)
    ids = tokenizer.encode(trained[at + len(_PROBE):]) if at >= 0 else []
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == "":
        return tokenizer.decode(ids[:1], skip_special_tokens=False)
    return None


def _shared_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _describe(messages: list[dict[str, str]]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), messages[0]["content"] if messages else "")
    text = " ".join(first.split())
    return f"the conversation starting {text[:40] + ('...' if len(text) > 40 else '')!r}"


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# The Jinja environment, as transformers sets it up for chat templates.


class _Refused(jinja2.TemplateError):
    """Raised by the template's own `raise_exception(message)`."""


def _raise_exception(message: str) -> None:
    raise _Refused(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _DictMaker:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Namespace(Namespace):
    """Jinja's `namespace()`, refusing underscore attributes (a way into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick, so `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> list:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictMaker(),
                       namespace=_Namespace)
    return env


def _compile(source: str, origin: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        where = f"{origin}:{err.lineno}" if origin.endswith(".jinja") else f"{origin}, template line {err.lineno}"
        raise DataError(f"{where}: invalid Jinja chat template ({err.message})") from None
