"""Chat templates: turn a conversation into token ids and a mask of the tokens the loss is taken on.

A built-in template is data: the text around each role's content. A model's own Hugging Face Jinja template
(data/jinja_template.py) renders the text and marks its assistant spans. Either way the conversation becomes
(text, trainable) pieces, each piece is tokenised on its own and the pieces are concatenated, so the trainable span
is exact (no character-offset guessing) and generation renders the prompt the same way training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from polytrain.data.jinja_template import FROM_TOKENIZER, JinjaTemplate, is_jinja_spec, load_jinja_template
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError, closest

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    bos: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    stop: tuple[str, ...]
    """Tokens that end an assistant turn (generation stops at any of them)."""
    special_tokens: tuple[str, ...] = field(default=())
    """Strings that must be single tokens of the tokenizer for this template to work."""

    @property
    def jinja_source(self) -> str:
        """The same template as a Hugging Face Jinja chat template: it renders the same text (what a tokenizer
        exported for other tools carries as its chat_template)."""

        def literal(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid Jinja string literal

        turns = "".join(
            f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {literal(role)} -%}}\n"
            f"    {{{{- {literal(self.prefix[role])} + message['content'] + {literal(self.suffix[role])} -}}}}\n"
            for i, role in enumerate(ROLES)
        )
        opening = literal(self.prefix["assistant"])
        return (
            f"{{{{- {literal(self.bos)} -}}}}\n{{%- for message in messages -%}}\n{turns}"
            "{%- else -%}\n    {{- raise_exception('unknown role: ' + message['role']) -}}\n{%- endif -%}\n"
            f"{{%- endfor -%}}\n{{%- if add_generation_prompt -%}}\n    {{{{- {opening} -}}}}\n{{%- endif -%}}\n"
        )


TEMPLATES: dict[str, ChatTemplate] = {
    # The template of the example tokenizer shipped under examples/.
    "polytrain": ChatTemplate(
        name="polytrain",
        bos="<|bos|>",
        prefix={"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
        suffix={"system": "<|end|>", "user": "<|end|>", "assistant": "<|end|>"},
        stop=("<|end|>", "<|eos|>"),
        special_tokens=("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # DeepSeek-V3 / R1 / V4 chat format (no thinking block).
    "deepseek": ChatTemplate(
        name="deepseek",
        bos="<｜begin▁of▁sentence｜>",
        prefix={"system": "", "user": "<｜User｜>", "assistant": "<｜Assistant｜>"},
        suffix={"system": "", "user": "", "assistant": "<｜end▁of▁sentence｜>"},
        stop=("<｜end▁of▁sentence｜>",),
        special_tokens=("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    ),
    "chatml": ChatTemplate(
        name="chatml",
        bos="",
        prefix={role: f"<|im_start|>{role}\n" for role in ROLES},
        suffix={role: "<|im_end|>\n" for role in ROLES},
        stop=("<|im_end|>",),
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
}


Template = ChatTemplate | JinjaTemplate


def get_template(name: str, tokenizer: Tokenizer) -> Template:
    """The template `name`: a built-in one, checked against the tokenizer (each special string must be one token);
    "tokenizer" (the Jinja template shipped with the tokenizer); or a path to a .jinja file or tokenizer_config.json."""
    if name not in TEMPLATES and is_jinja_spec(name):
        return load_jinja_template(name, tokenizer)
    if name not in TEMPLATES:
        choices = (*TEMPLATES, FROM_TOKENIZER)
        raise DataError(f"unknown chat template `{name}`{closest(name, choices)}; templates: {', '.join(choices)}, "
                        "or a path to a .jinja file or a tokenizer_config.json")
    template = TEMPLATES[name]
    missing = [t for t in template.special_tokens if tokenizer.token_id(t) is None]
    if missing:
        raise DataError(
            f"chat template `{name}` needs the special tokens {', '.join(missing)}, which {tokenizer.path} lacks; "
            "choose the template that matches the tokenizer (`data.chat_template`)"
        )
    return template


def render(
    messages: list[dict[str, str]],
    template: Template,
    tokenizer: Tokenizer,
    loss_on: str = "assistant",
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether the loss is taken on it.

    loss_on="assistant": only assistant content and the text that closes the turn (so the model learns to stop);
    loss_on="all": every token (the first is never a label).
    """
    if isinstance(template, JinjaTemplate):
        pieces = template.segments(messages, add_generation_prompt)
    else:
        pieces = _builtin_pieces(messages, template, add_generation_prompt)
    ids: list[int] = []
    mask: list[bool] = []
    for text, trainable in pieces:
        if text:
            piece = tokenizer.encode(text)
            ids.extend(piece)
            mask.extend([trainable or loss_on == "all"] * len(piece))
    return ids, mask


def _builtin_pieces(messages: list[dict[str, str]], template: ChatTemplate,
                    add_generation_prompt: bool) -> list[tuple[str, bool]]:
    pieces = [(template.bos, False)]
    for message in messages:
        role = message["role"]
        is_assistant = role == "assistant"
        pieces += [(template.prefix[role], False), (message["content"], is_assistant),
                   (template.suffix[role], is_assistant)]
    if add_generation_prompt:
        pieces.append((template.prefix["assistant"], False))
    return pieces


def stop_token_ids(template: Template, tokenizer: Tokenizer) -> set[int]:
    return {i for s in template.stop if (i := tokenizer.token_id(s)) is not None}
