"""Tokenised SFT samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.data.chat import Template, render
from polytrain.data.jsonl import load_conversations
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


@dataclass
class SFTDataset:
    samples: list[Sample]
    truncated: int
    dropped: int
    path: str

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def load_sft_dataset(
    path: str, tokenizer: Tokenizer, template: Template, max_len: int, loss_on: str, model_vocab: int
) -> SFTDataset:
    """Tokenise every conversation of `path`. Conversations longer than `max_len` are cut (counted in
    `truncated`); those left with no trained token are dropped (counted in `dropped`)."""
    samples, truncated, dropped = [], 0, 0
    for conversation in load_conversations(path):
        ids, mask = render(conversation, template, tokenizer, loss_on)
        if len(ids) > max_len + 1:
            truncated += 1
        sample = make_sample(ids, mask, max_len)
        if sample is None:
            dropped += 1
            continue
        samples.append(sample)
    if not samples:
        raise DataError(f"{path}: no conversation has a trained token within `data.max_seq_len` = {max_len}")
    top = max(int(s.input_ids.max()) for s in samples)
    if top >= model_vocab:
        raise DataError(
            f"{path}: token id {top} from {tokenizer.path} does not fit the model's vocab_size {model_vocab}; "
            f"set `model.vocab_size` >= {tokenizer.vocab_size}"
        )
    return SFTDataset(samples, truncated, dropped, path)
