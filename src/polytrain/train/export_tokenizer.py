"""The tokenizer side of an exported run: tokenizer.json (copied), tokenizer_config.json (the run's chat template as
Jinja, BOS / EOS / padding tokens taken from it) and, for a language model, generation_config.json (generation
stops at any of the template's stop tokens). `AutoTokenizer` loads the result and `apply_chat_template` gives the
token ids training saw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytrain.data.chat import get_template
from polytrain.data.tokenizer import Tokenizer

PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<｜▁pad▁｜>", "<|endoftext|>")
"""Usual names of a tokenizer's padding token, looked for in this order."""


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str | None
    pad: str | None
    ids: dict[str, int | None]
    """bos_token_id / eos_token_id / pad_token_id, as config.json and generation_config.json name them."""
    stop_ids: list[int]


def _pad(tokenizer: Tokenizer, template: Any) -> str | None:
    """A padding token no conversation ends on: the tokenizer's own (by a usual name), else id 0, which polytrain
    pads batches with; never a stop token nor the token that closes an assistant turn (a sequence-classification
    model reads the last token that is not padding)."""
    by_id = {i: token for token, i in tokenizer.vocab().items()}
    closing = set(template.stop)
    suffix = tokenizer.encode(template.suffix["assistant"]) if hasattr(template, "suffix") else []
    if suffix:
        closing.add(by_id.get(suffix[-1]))
    for token in (*PAD_NAMES, by_id.get(0)):
        if token is not None and tokenizer.token_id(token) is not None and token not in closing:
            return token
    return None


def special_tokens(tokenizer: Tokenizer, template: Any) -> SpecialTokens:
    """BOS (the template's), EOS (its first stop token: the end of an assistant turn) and padding of an export."""
    # a built-in template's BOS string; a Jinja template's `bos_token` variable (its tokenizer_config.json's)
    bos = getattr(template, "bos", None) or dict(getattr(template, "variables", ())).get("bos_token") or None
    stops = [token for token in template.stop if tokenizer.token_id(token) is not None]
    eos = stops[0] if stops else None
    pad = _pad(tokenizer, template)
    ids = {f"{name}_token_id": tokenizer.token_id(token) if token else None
           for name, token in (("bos", bos), ("eos", eos), ("pad", pad))}
    return SpecialTokens(bos, eos, pad, ids, [tokenizer.token_id(token) for token in stops])


class ExportTokenizer:
    """The run's tokenizer and chat template, loaded before any shard is written (a missing tokenizer fails the
    export up front)."""

    def __init__(self, tokenizer_path: str, template_name: str) -> None:
        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.template = get_template(template_name, self.tokenizer)
        self.special = special_tokens(self.tokenizer, self.template)

    def write(self, out: Path, max_length: int, language_model: bool) -> None:
        """tokenizer.json, tokenizer_config.json and (language_model) generation_config.json into `out`."""
        shutil.copyfile(self.tokenizer.path, out / "tokenizer.json")
        special = self.special
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": special.bos,
            "eos_token": special.eos,
            "pad_token": special.pad,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
            "chat_template": self.template.jinja_source,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if language_model:
            stops: int | list[int] | None = special.stop_ids[0] if len(special.stop_ids) == 1 else special.stop_ids
            generation = {"bos_token_id": special.ids["bos_token_id"], "eos_token_id": stops or None,
                          "pad_token_id": special.ids["pad_token_id"]}
            (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
