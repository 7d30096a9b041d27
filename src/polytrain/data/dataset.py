"""Tokenised SFT samples.

A training set is tokenised conversation by conversation into a `TokenStore` (flat, memory-mapped token files);
its samples are built when they are asked for, so neither the raw records nor one tensor per conversation are held
in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polytrain.data.chat import Template, render
from polytrain.data.jsonl import iter_conversations
from polytrain.data.store import StoredSequence, TokenStore
from polytrain.data.tokenizer import Tokenizer
from polytrain.errors import DataError


@dataclass
class Sample:
    """One tokenised conversation: `input_ids` [n] and `labels` [n] (next token, or -100 where no loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


IGNORE = -100


def full_sample(length: int, vocab: int, generator: torch.Generator) -> Sample:
    """A made-up sample of `length` random tokens, every one trained (the most a sample can cost)."""
    ids = torch.randint(0, vocab, (length + 1,), generator=generator)
    return Sample(ids[:-1], ids[1:])


def make_sample(ids: list[int], mask: list[bool], max_len: int) -> Sample | None:
    """Shift to next-token targets and cut to `max_len` inputs; None when no target token remains."""
    ids = ids[: max_len + 1]
    mask = mask[: max_len + 1]
    input_ids = torch.tensor(ids[:-1], dtype=torch.long)
    labels = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])], dtype=torch.long)
    sample = Sample(input_ids, labels)
    return sample if sample.num_loss_tokens else None


def stored_sample(store: TokenStore, i: int) -> Sample:
    """The `Sample` of store sequence i (a rendered conversation cut to `max_len + 1` tokens): what `make_sample`
    returns for it."""
    ids, mask = store.tokens(i)
    ids = ids.astype(np.int64)
    labels = np.where(mask[1:].astype(bool), ids[1:], IGNORE)
    return Sample(torch.from_numpy(ids[:-1]), torch.from_numpy(labels))


def store_rendered(store: TokenStore, ids: list[int], mask: list[bool], max_len: int) -> bool:
    """Cut a rendered conversation to `max_len + 1` tokens and append it to `store`, unless no trained target
    token remains (then False: the conversation is dropped)."""
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if not any(mask[1 : len(ids)]):
        return False
    store.append(ids, mask)
    return True


class SampleSequence(StoredSequence[Sample]):
    """SFT samples built on demand from a `TokenStore` of rendered conversations already cut to `max_len + 1`
    tokens: item i is the `Sample` `make_sample` returns for sequence i. A slice is a list of samples."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    @property
    def num_tokens(self) -> int:
        """Input tokens of all samples (a sample has one fewer than its sequence)."""
        return self.store.num_tokens - len(self.store)

    @property
    def longest(self) -> int:
        """Input tokens of the longest sample."""
        return max(self.store.longest() - 1, 0)

    def item(self, i: int) -> Sample:
        return stored_sample(self.store, i)


@dataclass
class SFTDataset:
    samples: Sequence[Sample]
    truncated: int
    dropped: int
    path: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        if isinstance(self.samples, SampleSequence):
            return self.samples.num_tokens
        return sum(len(s) for s in self.samples)

    @property
    def longest(self) -> int:
        """Input tokens of the longest sample (without building the samples of a stored set)."""
        if isinstance(self.samples, SampleSequence):
            return self.samples.longest
        return max((len(s) for s in self.samples), default=0)


def load_sft_dataset(
    path: str, tokenizer: Tokenizer, template: Template, max_len: int, loss_on: str, model_vocab: int
) -> SFTDataset:
    """Tokenise the conversations of `path` one at a time into a `TokenStore`. Conversations longer than
    `max_len` are cut (counted in `truncated`); those left with no trained token are dropped (counted in
    `dropped`)."""
    store, truncated, dropped = TokenStore(), 0, 0
    for conversation in iter_conversations(path):
        ids, mask = render(conversation, template, tokenizer, loss_on)
        if len(ids) > max_len + 1:
            truncated += 1
        if not store_rendered(store, ids, mask, max_len):
            dropped += 1
    store.close()
    if not len(store):
        raise DataError(f"{path}: no conversation has a trained token within `data.max_seq_len` = {max_len}")
    if store.max_id >= model_vocab:
        raise DataError(
            f"{path}: token id {store.max_id} from {tokenizer.path} does not fit the model's vocab_size "
            f"{model_vocab}; set `model.vocab_size` >= {tokenizer.vocab_size}"
        )
    return SFTDataset(SampleSequence(store), truncated, dropped, path)
