"""Turning a list of samples into model inputs: packed rows with document boundaries, or padded rows."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from polytrain.data.dataset import IGNORE, Sample

if TYPE_CHECKING:
    from polytrain.models.common.context_split import ContextSplit


def reports(split: ContextSplit | None) -> bool:
    """Whether this rank counts per-row numbers in logged sums: every context-parallel rank computes the same ones
    (e.g. a pair's DPO loss), so only the first does."""
    return split is None or split.rank == 0


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, L]
    labels: torch.Tensor  # [R, L], IGNORE where no loss
    position_ids: torch.Tensor  # [R, L], restarting at 0 for each document
    doc_ids: torch.Tensor  # [R, L], distinct per document in a row; padding gets its own id
    num_samples: int
    documents: tuple[int, ...] | None = None
    """Documents in each row, as collated (None: read from doc_ids)."""
    split: ContextSplit | None = None
    """With context parallelism: the tensors hold this rank's chunks of each row (`split.local`)."""
    whole_row_loss_tokens: tuple[int, ...] | None = None
    """With context parallelism: the trained tokens of each whole row, over all context-parallel ranks."""

    @property
    def num_loss_tokens(self) -> int:
        """Trained tokens in this batch's tensors (with context parallelism: this rank's chunks)."""
        return int((self.labels != IGNORE).sum())

    @property
    def row_loss_tokens(self) -> int:
        """Trained tokens of the batch's whole rows (= num_loss_tokens without context parallelism)."""
        return self.num_loss_tokens if self.whole_row_loss_tokens is None else sum(self.whole_row_loss_tokens)

    def context_local(self, split: ContextSplit) -> Batch:
        """This context-parallel rank's chunks of every row."""
        per_row = tuple((self.labels != IGNORE).sum(dim=1).tolist())
        return Batch(split.local(self.input_ids), split.local(self.labels), split.local(self.position_ids),
                     split.local(self.doc_ids), self.num_samples, self.documents, split, per_row)

    def whole_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """A [B, T] tensor of this batch's tokens over the whole rows (gathered under context parallelism)."""
        return tensor if self.split is None else self.split.gather(tensor)

    def whole_row_sum(self, per_row: torch.Tensor) -> torch.Tensor:
        """Per-row sums [B] over the whole rows from this batch's partial ones (summed over context-parallel ranks)."""
        return per_row if self.split is None else self.split.sum_over_ranks(per_row)

    @property
    def reports(self) -> bool:
        """Whether this rank counts the batch's per-row numbers in logged sums (`reports`)."""
        return reports(self.split)

    def local_part(self, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of `whole_rows`: this rank's tokens of a whole-row tensor."""
        return tensor if self.split is None else self.split.local(tensor)

    @property
    def multi_document(self) -> bool:
        """True when some row holds more than one document (plain causal attention would leak across them).
        Known on the host from the collation, so asking never waits for the device."""
        if self.documents is not None:
            return any(n > 1 for n in self.documents)
        return bool((self.doc_ids.amax(dim=1) > 0).any())

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int((self.doc_ids >= 0).sum())

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start..stop-1 (e.g. one micro-batch of a stacked pipeline batch)."""
        documents = self.documents[start:stop] if self.documents is not None else None
        per_row = self.whole_row_loss_tokens[start:stop] if self.whole_row_loss_tokens is not None else None
        return Batch(self.input_ids[start:stop], self.labels[start:stop], self.position_ids[start:stop],
                     self.doc_ids[start:stop], stop - start, documents, self.split, per_row)

    def to(self, device: torch.device) -> Batch:
        return replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device),
                       position_ids=self.position_ids.to(device), doc_ids=self.doc_ids.to(device))


def pack_rows(samples: list[Sample], max_len: int, packing: bool) -> list[list[Sample]]:
    """Group samples into rows. With packing, consecutive samples share a row while they fit in `max_len`
    tokens (order kept, so the result is a pure function of the input); without, one sample per row."""
    if not packing:
        return [[s] for s in samples]
    rows: list[list[Sample]] = []
    used = max_len + 1
    for sample in samples:
        if used + len(sample) > max_len:
            rows.append([])
            used = 0
        rows[-1].append(sample)
        used += len(sample)
    return rows


def collate(
    samples: list[Sample], max_len: int, packing: bool, pad_id: int = 0, fixed_rows: int | None = None,
    width_multiple: int = 1,
) -> Batch:
    """A padded [rows, longest row] batch; padding has labels IGNORE and doc id -1.

    fixed_rows: pad to exactly [fixed_rows, max_len] (pipeline parallelism needs every micro-batch the same shape).
    width_multiple: round the width up to a multiple of this (sequence parallelism splits positions evenly).
    """
    rows = pack_rows(samples, max_len, packing)
    width = max(sum(len(s) for s in row) for row in rows)
    width = -(-width // width_multiple) * width_multiple
    if fixed_rows is not None:
        if len(rows) > fixed_rows:
            raise ValueError(f"{len(rows)} rows do not fit in {fixed_rows}")
        width = max_len
        shape = (fixed_rows, width)
    else:
        shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    doc_ids = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, sample in enumerate(row):
            end = start + len(sample)
            input_ids[r, start:end] = sample.input_ids
            labels[r, start:end] = sample.labels
            position_ids[r, start:end] = torch.arange(len(sample))
            doc_ids[r, start:end] = d
            start = end
    documents = tuple(len(row) for row in rows) + (0,) * (shape[0] - len(rows))
    return Batch(input_ids, labels, position_ids, doc_ids, len(samples), documents)


def concat(batches: list[Batch]) -> Batch:
    """Stack same-width batches row-wise (a pipeline splits them back into micro-batches)."""
    return Batch(
        torch.cat([b.input_ids for b in batches]),
        torch.cat([b.labels for b in batches]),
        torch.cat([b.position_ids for b in batches]),
        torch.cat([b.doc_ids for b in batches]),
        sum(b.num_samples for b in batches),
        None if any(b.documents is None for b in batches) else tuple(n for b in batches for n in b.documents),
    )
