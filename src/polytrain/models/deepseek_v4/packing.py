"""Where DeepSeek-V4's attention may look in a row that packs several documents.

Documents are contiguous in a row and their positions restart at 0, so a token's document starts at column
`column - position`. The sliding window stops at that column. Compressed entries are made per document: a window
of `ratio` tokens starts at every document position that is a multiple of the ratio and lies wholly inside the
document, so no entry pools tokens of two documents. Entries are numbered in row order, which keeps each
document's entries contiguous: a query sees the entries [first, limit) of its own document, `limit - first` being
(position + 1) // ratio as in an unpacked row. Padding (document id -1) sees no entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedEntries:
    """One compression ratio's entries in packed rows: T = S // ratio slots, the unused ones never visible."""

    starts: torch.Tensor
    """[B, T] column of each entry's first token (0 for unused slots)."""
    windows: torch.Tensor
    """[B, T] the entry's window index within its document (its rotary position is windows x ratio)."""
    has_before: torch.Tensor
    """[B, T] whether the document's previous window exists (it is then entry k - 1)."""
    first: torch.Tensor
    """[B, S] the first entry of each token's document."""
    limit: torch.Tensor
    """[B, S] one past the last entry each token sees."""


@dataclass
class PackedRows:
    doc_start: torch.Tensor
    """[B, S] column of the first token of each token's document."""
    entries: dict[int, PackedEntries]
    """By compression ratio."""


def packed_rows(doc_ids: torch.Tensor, position_ids: torch.Tensor, ratios: set[int]) -> PackedRows:
    batch, seq = doc_ids.shape
    columns = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    doc_start = (columns - position_ids).clamp(min=0)
    real = doc_ids >= 0
    doc_start = torch.where(real, doc_start, columns)  # padding: each token alone
    entries = {}
    for ratio in sorted(ratios):
        slots = seq // ratio
        last = (columns + ratio - 1).clamp(max=seq - 1)
        starts_here = (real & (position_ids % ratio == 0) & (columns + ratio - 1 < seq)
                       & (doc_start.gather(1, last) == doc_start))
        count = starts_here.long().cumsum(dim=1)
        rank = torch.where(starts_here, count - 1, slots)  # unused slot `slots` is dropped below
        starts = torch.zeros(batch, slots + 1, dtype=torch.long, device=doc_ids.device)
        starts.scatter_(1, rank, columns)
        starts = starts[:, :slots]
        windows = position_ids.gather(1, starts) // ratio
        before = count - starts_here.long()  # entries starting before each column
        first = before.gather(1, doc_start)
        limit = torch.where(real, first + (position_ids + 1) // ratio, first)
        entries[ratio] = PackedEntries(starts, windows, windows > 0, first, limit)
    return PackedRows(doc_start, entries)
