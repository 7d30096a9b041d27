"""Preference pairs: `{"prompt", "chosen", "rejected"}` JSONL, each either plain text or OpenAI-style messages.

prompt: a string (one user turn) or a list of messages; chosen / rejected: a string (the assistant reply) or a list
of messages (the reply turns). Optional: `ref_chosen_logp` / `ref_rejected_logp` (precomputed reference
log-probabilities), `margin` (reward-model target gap). Errors name the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytrain.data.chat import Template, render
from polytrain.data.dataset import Sample, make_sample
from polytrain.data.jsonl import check_messages, read_jsonl
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample
    record: dict[str, Any]
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    margin: float = 0.0


def _messages(value: Any, where: str, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in value]
    raise DataError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def parse_pair(record: Any, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= set(record):
        found = f" (found keys: {', '.join(record)})" if isinstance(record, dict) else ""
        raise DataError(f"{where}: a preference pair needs `prompt`, `chosen` and `rejected`{found}")
    prompt = _messages(record["prompt"], f"{where}: prompt", "user")
    chosen = _messages(record["chosen"], f"{where}: chosen", "assistant")
    rejected = _messages(record["rejected"], f"{where}: rejected", "assistant")
    if chosen == rejected:
        raise DataError(f"{where}: `chosen` and `rejected` are identical, so the pair teaches nothing")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        check_messages({"messages": prompt + turns}, f"{where}: {name}")
    return prompt, chosen, rejected


def load_preference_pairs(path: str | Path, tokenizer: Tokenizer, template: Template, max_len: int,
                          model_vocab: int) -> tuple[list[PreferencePair], int]:
    """(pairs, number dropped because the prompt leaves no room for a scored reply within max_len)."""
    pairs, dropped = [], 0
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        prompt, chosen, rejected = parse_pair(record, where)
        sides = []
        for turns in (chosen, rejected):
            ids, mask = render(prompt + turns, template, tokenizer, "assistant")
            sides.append(make_sample(ids, mask, max_len))
        if None in sides:
            dropped += 1
            continue
        ref = (record.get("ref_chosen_logp"), record.get("ref_rejected_logp"))
        pairs.append(PreferencePair(sides[0], sides[1], record, ref[0], ref[1], float(record.get("margin", 0.0))))
    if not pairs:
        raise DataError(f"{path}: no usable preference pair (empty file, or every prompt exceeds data.max_seq_len)")
    top = max(int(max(p.chosen.input_ids.max(), p.rejected.input_ids.max())) for p in pairs)
    if top >= model_vocab:
        raise DataError(f"{path}: token id {top} does not fit the model's vocab_size {model_vocab}")
    return pairs, dropped
