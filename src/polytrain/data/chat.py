"""Chat templates: turn a conversation into token ids and a mask of the tokens the loss is taken on.

A template is data: the text around each role's content. Each piece is tokenised on its own and the pieces are
concatenated, so the trainable span is exact (no character-offset guessing) and generation renders the prompt
the same way training did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def get_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The template `name`, checked against the tokenizer (each special string must be one token)."""
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template `{name}`{closest(name, TEMPLATES)}; templates: {', '.join(TEMPLATES)}")
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
    template: ChatTemplate,
    tokenizer: Tokenizer,
    loss_on: str = "assistant",
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether the loss is taken on it.

    loss_on="assistant": only assistant content and the token that closes the turn (so the model learns to stop);
    loss_on="all": every token after the first.
    """
    ids: list[int] = []
    mask: list[bool] = []

    def add(text: str, trainable: bool) -> None:
        if text:
            piece = tokenizer.encode(text)
            ids.extend(piece)
            mask.extend([trainable or loss_on == "all"] * len(piece))

    add(template.bos, False)
    for message in messages:
        role = message["role"]
        is_assistant = role == "assistant"
        add(template.prefix[role], False)
        add(message["content"], is_assistant)
        add(template.suffix[role], is_assistant)
    if add_generation_prompt:
        add(template.prefix["assistant"], False)
    return ids, mask


def stop_token_ids(template: ChatTemplate, tokenizer: Tokenizer) -> set[int]:
    return {i for s in template.stop if (i := tokenizer.token_id(s)) is not None}
