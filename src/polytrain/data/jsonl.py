"""Conversation datasets: OpenAI-style `{"messages": [{"role": ..., "content": ...}, ...]}` records, in any format
`data.records` reads (JSON Lines, JSON, Parquet, Arrow, `datasets` directories).

Every problem is reported as `where: what is wrong`, `where` being `file:line` for JSON Lines and `file, row N` for
columnar files, so a user can jump straight to the bad record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polytrain.data.chat import ROLES
from polytrain.data.records import empty_dataset, read_jsonl, read_records
from polytrain.errors import DataError, closest

__all__ = ["check_messages", "iter_conversations", "load_conversations", "read_jsonl"]


def check_messages(record: Any, where: str) -> list[dict[str, str]]:
    """Validate one conversation record and return its messages."""
    if not isinstance(record, dict) or "messages" not in record:
        keys = f" (found keys: {', '.join(record)})" if isinstance(record, dict) else ""
        raise DataError(f"{where}: expected an object with a `messages` list{keys}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with `role` and `content`")
        role = message.get("role")
        if role not in ROLES:
            hint = closest(str(role), ROLES)
            raise DataError(f"{where}: messages[{i}].role is {role!r}{hint}; roles: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so there is nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_conversations(path: str | Path) -> Iterator[list[dict[str, str]]]:
    """The conversations of `path`, checked and yielded one at a time; an empty dataset is an error."""
    empty = True
    for where, record in read_records(path):
        empty = False
        yield check_messages(record, where)
    if empty:
        raise empty_dataset(path)


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """All conversations of `path` in a list (`iter_conversations` streams them)."""
    return list(iter_conversations(path))
