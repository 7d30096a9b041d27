"""Reading conversation datasets: OpenAI-style `{"messages": [{"role": ..., "content": ...}, ...]}` JSONL.

Every problem is reported as `file:line: what is wrong`, so a user can jump straight to the bad record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from polytrain.data.chat import ROLES
from polytrain.errors import DataError, closest


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None


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


def load_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """All conversations of a messages JSONL file; an empty file is an error."""
    conversations = [check_messages(record, f"{path}:{number}") for number, record in read_jsonl(path)]
    if not conversations:
        raise DataError(f"{path}: dataset is empty (no JSON lines)")
    return conversations
