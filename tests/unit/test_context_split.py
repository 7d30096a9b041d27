"""Context parallelism's split of a row into load-balanced causal chunks, and the mask of a rank's queries (the
all-gather itself runs in the gloo parity tests, tests/distributed/test_context_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from polytrain.models.common.context_split import ContextSplit, context_mask, to_rank_order, to_sequence_order
from polytrain.models.deepseek_v3.model import attention_mask


@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_an_early_and_the_matching_late_chunk(size):
    width = 16 * size
    row = torch.arange(width)[None]
    held = [ContextSplit(size, rank).local(row)[0] for rank in range(size)]
    assert torch.equal(torch.sort(torch.cat(held)).values, row[0])  # every token exactly once
    chunk = width // (2 * size)
    for rank, tokens in enumerate(held):
        assert torch.equal(tokens, ContextSplit(size, rank).positions(width))
        assert tokens[0] == rank * chunk and tokens[chunk] == (2 * size - 1 - rank) * chunk
    # causal work per rank (keys seen by its queries) is the same for every rank
    work = {int((tokens + 1).sum()) for tokens in held}
    assert len(work) == 1


def test_gathered_order_is_the_sequence_and_back():
    split = ContextSplit(4, 0)
    full = torch.randn(2, 32, 3)
    stacked = torch.stack([ContextSplit(4, r).local(full) for r in range(4)])
    assert torch.equal(to_sequence_order(stacked, split, 1), full)
    assert torch.equal(to_rank_order(full, split, 1), stacked)


def test_a_width_that_does_not_split_evenly_is_named():
    with pytest.raises(ValueError, match="a row of 30 tokens does not split into 2 x cp = 4 equal chunks"):
        ContextSplit(2, 0).local(torch.zeros(1, 30))


def test_the_mask_of_a_ranks_queries_is_its_rows_of_the_whole_mask():
    """Without packing (causal) and with packed documents, as a one-rank group gathers (size 1 = identity)."""
    width, size = 24, 3
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 7 + [-1] * 3])
    whole = attention_mask(doc_ids, None, 0, width)
    causal = torch.ones(width, width).tril().bool()
    for rank in range(size):
        split = ContextSplit(size, rank)
        rows = split.positions(width)
        mine = context_mask(split, width // size, None, torch.device("cpu"))
        assert torch.equal(mine[0, 0], causal[rows])
        gathered = ContextSplit(1, 0)  # the whole row is "gathered" from one rank: check the document part
        packed = context_mask(gathered, width, doc_ids, torch.device("cpu"))
        assert torch.equal(packed, whole)
