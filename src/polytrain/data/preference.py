"""Preference pairs: `{"prompt", "chosen", "rejected"}` records, each either plain text or OpenAI-style messages,
in any format `data.records` reads (JSON Lines, JSON, Parquet, Arrow, `datasets` directories).

prompt: a string (one user turn) or a list of messages; chosen / rejected: a string (the assistant reply) or a list
of messages (the reply turns). Optional: `ref_chosen_logp` / `ref_rejected_logp` (precomputed reference
log-probabilities), `margin` (reward-model target gap). Errors name the file and line (or row).

Pairs are tokenised one record at a time into a `TokenStore`; a `PairSequence` builds each pair when asked.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytrain.data.chat import Template, render
from polytrain.data.dataset import Sample, store_rendered, stored_sample
from polytrain.data.jsonl import check_messages
from polytrain.data.records import read_records
from polytrain.data.store import StoredSequence, TokenStore
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample
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


def _number(record: dict[str, Any], key: str, where: str, default: float) -> float:
    value = record.get(key)
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: `{key}` must be a number, got {value!r:.40}") from None


class PairSequence(StoredSequence[PreferencePair]):
    """The pairs of a preference dataset, built on demand: pair i is sequences 2i (chosen) and 2i + 1 (rejected) of
    a `TokenStore`, with its reference log-probabilities and margin. A slice is a list of pairs."""

    def __init__(self, path: str | Path, store: TokenStore, refs: array, margins: array, sources: array) -> None:
        self.path, self.store, self.refs, self.margins, self.sources = path, store, refs, margins, sources

    def __len__(self) -> int:
        return len(self.margins)

    def item(self, i: int) -> PreferencePair:
        ref_chosen, ref_rejected = (None if math.isnan(v) else v for v in self.refs[2 * i : 2 * i + 2])
        return PreferencePair(stored_sample(self.store, 2 * i), stored_sample(self.store, 2 * i + 1),
                              ref_chosen, ref_rejected, self.margins[i])

    def missing_reference(self) -> list[int]:
        """Indices of the pairs without both reference log-probabilities."""
        return [i for i in range(len(self)) if math.isnan(self.refs[2 * i]) or math.isnan(self.refs[2 * i + 1])]

    def records(self) -> Iterator[dict[str, Any]]:
        """The source record of each pair, in order (read again from the dataset)."""
        wanted = iter(self.sources)
        target = next(wanted, None)
        for number, (_, record) in enumerate(read_records(self.path)):
            if number == target:
                yield record
                target = next(wanted, None)
                if target is None:
                    return


def load_preference_pairs(path: str | Path, tokenizer: Tokenizer, template: Template, max_len: int,
                          model_vocab: int) -> tuple[PairSequence, int]:
    """(pairs, number dropped because the prompt leaves no room for a scored reply within max_len)."""
    store, refs, margins, sources = TokenStore(), array("d"), array("d"), array("q")
    dropped = 0
    for number, (where, record) in enumerate(read_records(path)):
        prompt, chosen, rejected = parse_pair(record, where)
        ref = [_number(record, key, where, math.nan) for key in ("ref_chosen_logp", "ref_rejected_logp")]
        margin = _number(record, "margin", where, 0.0)
        sides = [render(prompt + turns, template, tokenizer, "assistant") for turns in (chosen, rejected)]
        if not all(any(mask[1 : max_len + 1]) for _, mask in sides):
            dropped += 1
            continue
        for ids, mask in sides:
            store_rendered(store, ids, mask, max_len)
        refs.extend(ref)
        margins.append(margin)
        sources.append(number)
    store.close()
    if not margins:
        raise DataError(f"{path}: no usable preference pair (empty file, or every prompt exceeds data.max_seq_len)")
    if store.max_id >= model_vocab:
        raise DataError(f"{path}: token id {store.max_id} does not fit the model's vocab_size {model_vocab}")
    return PairSequence(path, store, refs, margins, sources), dropped
