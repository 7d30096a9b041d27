"""DeepSeek-V4 on packed rows: each document's logits and gradients are those of the document alone (the sliding
window, the compressed windows and the indexer's entries all stop at document boundaries)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.data.dataset import Sample
from polytrain.data.packing import collate
from polytrain.models import build_model, preset
from polytrain.models.deepseek_v4.packing import packed_rows

LENGTHS = (13, 22, 9, 30)  # not multiples of the ratios (4, 8) or of the window (8)


@pytest.fixture(scope="module")
def model():
    lm = build_model(preset("tiny-v4"), "cpu", seed=1)
    for p in lm.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.15, generator=torch.Generator().manual_seed(p.numel()))
    for layer in lm.layers:
        layer.self_attn.query_block = 16  # several query blocks per row
    return lm


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    return [Sample(torch.randint(0, 128, (n,), generator=g), torch.randint(0, 128, (n,), generator=g))
            for n in LENGTHS]


def test_packed_rows_give_each_document_its_own_logits_and_gradients(model):
    samples = _samples()
    packed = collate(samples, max_len=48, packing=True)  # rows [13, 22, 9] and [30 + padding]
    assert packed.input_ids.shape == (2, 44) and (packed.doc_ids[1] < 0).any()
    model.zero_grad(set_to_none=True)
    logits = model(packed.input_ids, position_ids=packed.position_ids, doc_ids=packed.doc_ids)
    real = packed.doc_ids >= 0
    F.cross_entropy(logits[real], packed.labels[real], reduction="sum").backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone_loss = 0.0
    row, start = 0, 0
    for sample in samples:
        if start + len(sample) > packed.input_ids.shape[1]:
            row, start = row + 1, 0
        alone = model(sample.input_ids[None])
        torch.testing.assert_close(logits[row, start : start + len(sample)], alone[0], atol=1e-5, rtol=1e-5)
        alone_loss = alone_loss + F.cross_entropy(alone[0], sample.labels, reduction="sum")
        start += len(sample)
    alone_loss.backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_packing_without_the_document_layout_would_differ(model):
    samples = _samples()[:2]
    packed = collate(samples, max_len=48, packing=True)
    with torch.no_grad():
        kept = model(packed.input_ids, position_ids=packed.position_ids, doc_ids=packed.doc_ids)
        leaky = model(packed.input_ids, position_ids=packed.position_ids)
    torch.testing.assert_close(kept[:, :13], leaky[:, :13])
    assert not torch.allclose(kept[:, 13:], leaky[:, 13:])


def test_entries_are_made_per_document_and_seen_only_from_it():
    # documents of 5 and 9 tokens, then 2 padding columns; ratio 4
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [-1] * 2])
    position_ids = torch.tensor([list(range(5)) + list(range(9)) + [0, 0]])
    layout = packed_rows(doc_ids, position_ids, {4})
    entries = layout.entries[4]
    assert layout.doc_start[0].tolist() == [0] * 5 + [5] * 9 + [14, 15]
    assert entries.starts[0, :3].tolist() == [0, 5, 9]  # doc 0: positions 0-3; doc 1: positions 0-3, 4-7
    assert entries.windows[0, :3].tolist() == [0, 0, 1]
    assert entries.has_before[0, :3].tolist() == [False, False, True]
    assert entries.first[0].tolist() == [0] * 5 + [1] * 9 + [3, 3]
    doc0, doc1 = [0, 0, 0, 1, 1], [1, 1, 1, 2, 2, 2, 2, 3, 3]  # first + (position + 1) // 4
    assert entries.limit[0].tolist() == [*doc0, *doc1, 3, 3]
