"""DeepSeek-V4 attention under context parallelism: a rank holds two load-balanced causal chunks of each row
(`models/common/context_split.py`) and attends its own queries over the whole row.

What is gathered: each rank projects its own tokens, then all-gathers the per-token projections the keys are
made of, and builds the whole row's keys from them:
- the shared key / value of every token (head_dim values; while the sliding window is no wider than a chunk it
  reads only the chunk before each of a rank's chunks, but one gather of the row is one collective instead of
  neighbour exchanges);
- the compressor's per-token key / value and gate series (2 x head_dim values per token for HCA, 4 x head_dim for
  CSA, whose overlapping windows also pool the previous window's series), pooled into the row's compressed entries
  on every rank: so a window that crosses a chunk boundary, or the window before a chunk, needs no special case,
  and packed rows compress per document exactly as without context parallelism;
- for CSA, the lightning indexer's own compressor series (4 x index_head_dim, without autograd); its top-k then
  runs for the rank's queries over the whole row's indexer keys.
For DeepSeek-V4-Pro (head_dim 512, index_head_dim 128) that is 512 values per token on sliding-window-only layers,
1,536 on HCA layers and 3,072 on CSA layers, against 7,168 for gathering the attention input itself. The backward
of each gather is a reduce-scatter of the gradients of those projections (the indexer's have none). Gathering the
pooled entries instead (S / ratio long) would move less on HCA / CSA layers but needs each chunk's boundary
windows from its neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from polytrain.models.common.context_split import ContextSplit
from polytrain.models.deepseek_v4.packing import PackedEntries, PackedRows, packed_rows


@dataclass
class WholeRows:
    """What a rank's attention needs of the whole rows its chunks come from."""

    split: ContextSplit
    packed: PackedRows | None
    """The whole rows' document layout (None: one sequence per row)."""

    def local_entries(self, ratio: int) -> PackedEntries:
        """The packed layout of one compression ratio with its per-query fields ([B, S]) cut to this rank's
        queries; the per-entry fields stay the whole row's."""
        assert self.packed is not None
        whole = self.packed.entries[ratio]
        return replace(whole, first=self.split.local(whole.first), limit=self.split.local(whole.limit))


def whole_rows(split: ContextSplit, position_ids: torch.Tensor, doc_ids: torch.Tensor | None,
               ratios: set[int]) -> WholeRows:
    """Gather the rows' positions and documents from the context-parallel ranks (every rank then takes the
    same packed / unpacked branch) and lay out their documents. Keys are rotated where they are projected, at each
    token's own position, so no whole-row rotary tables are needed."""
    with torch.no_grad():
        positions = split.gather(position_ids)
        packed = None
        if doc_ids is not None:
            docs = split.gather(doc_ids)
            if bool((docs.amax(dim=1) > 0).any()):
                packed = packed_rows(docs, positions, ratios)
        return WholeRows(split, packed)
