"""Prompts for RL and distillation: what the policy is asked, and (optionally) the reference answer rewards use.

Accepted records (in any format `data.records` reads: JSON Lines, JSON, Parquet, Arrow, `datasets` directories):
  {"prompt": "What is 2 + 3?", "answer": "5"}
  {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "5"}]}   # SFT data works as is:
       a trailing assistant turn is the reference answer and is not part of the prompt
  optional keys: "answer" (overrides the trailing turn), "teacher" (distillation: which teacher scores this prompt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from polytrain.data.chat import Template, render
from polytrain.data.jsonl import check_messages
from polytrain.data.records import empty_dataset, read_records
from polytrain.data.store import StoredSequence, TokenStore
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError


@dataclass
class PromptItem:
    ids: list[int]
    """The rendered prompt, ending with the assistant-turn opening."""
    text: str
    """The last user message (what reward functions see as the prompt)."""
    answer: str | None
    teacher: str | None = None


def _messages(record: object, where: str) -> tuple[list[dict[str, str]], str | None]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}], None
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            check_messages(record, where)
            return [dict(m) for m in messages[:-1]], messages[-1]["content"]
        check_messages({"messages": [*messages, {"role": "assistant", "content": ""}]}, where)
        return [dict(m) for m in messages], None
    keys = f" (found keys: {', '.join(record)})" if isinstance(record, dict) else ""
    raise DataError(f"{where}: expected an object with a `prompt` string or a `messages` list{keys}")


class PromptSequence(StoredSequence[PromptItem]):
    """The prompts of a dataset, built on demand from two `TokenStore`s: the rendered prompts' token ids, and the
    UTF-8 bytes of each prompt's (text, answer, teacher). A slice is a list of prompts."""

    def __init__(self) -> None:
        self._ids, self._fields = TokenStore(), TokenStore()

    def append(self, item: PromptItem) -> None:
        self._ids.append(item.ids, [False] * len(item.ids))
        fields = json.dumps([item.text, item.answer, item.teacher], ensure_ascii=False).encode()
        self._fields.append(list(fields), [False] * len(fields))

    def close(self) -> PromptSequence:
        self._ids.close()
        self._fields.close()
        return self

    def __len__(self) -> int:
        return len(self._ids)

    def item(self, i: int) -> PromptItem:
        text, answer, teacher = json.loads(self._fields.tokens(i)[0].astype("uint8").tobytes().decode())
        return PromptItem(self._ids.tokens(i)[0].tolist(), text, answer, teacher)


def load_prompts(path: str | Path, tokenizer: Tokenizer, template: Template,
                 max_prompt_len: int) -> tuple[PromptSequence, int]:
    """(prompts, number dropped because the rendered prompt is longer than `max_prompt_len` tokens), read and
    rendered record by record into a memory-mapped store (a prompt set larger than memory trains as any other)."""
    items, dropped = PromptSequence(), 0
    for where, record in read_records(path):
        messages, answer = _messages(record, where)
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user message")
        if "answer" in record:
            answer = None if record["answer"] is None else str(record["answer"])
        teacher = record.get("teacher")
        if teacher is not None and not isinstance(teacher, str):
            raise DataError(f"{where}: `teacher` must be a string (a name from distill.teachers)")
        ids, _ = render(messages, template, tokenizer, add_generation_prompt=True)
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        items.append(PromptItem(ids, messages[-1]["content"], answer, teacher))
    items.close()
    if not items and not dropped:
        raise empty_dataset(path)
    if not items:
        raise DataError(f"{path}: no prompt fits in {max_prompt_len} tokens (data.max_seq_len minus the longest "
                        "completion)")
    return items, dropped
