"""Packing: several conversations per row give the same per-document loss as each run alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polytrain.algorithms.sft import StepTokens, sft_loss
from polytrain.data.dataset import IGNORE, Sample
from polytrain.data.packing import collate, pack_rows
from polytrain.models import build_model, preset


def random_sample(length: int) -> Sample:
    ids = torch.randint(0, 100, (length,))
    labels = torch.randint(0, 100, (length,))
    labels[: length // 3] = IGNORE
    return Sample(ids, labels)


def test_rows_respect_max_len_and_keep_order():
    samples = [random_sample(n) for n in (5, 9, 7, 3, 10)]
    rows = pack_rows(samples, max_len=16, packing=True)
    assert [[len(s) for s in row] for row in rows] == [[5, 9], [7, 3], [10]]
    assert all(sum(len(s) for s in row) <= 16 for row in rows)
    assert [len(row) for row in pack_rows(samples, 16, packing=False)] == [1] * 5


def test_a_micro_batch_packs_into_the_rows_its_longest_sample_bounds():
    """The pipeline's micro-batch shape (SFTObjective.pipeline_rows) relies on it: with samples of at most L tokens,
    every row but the last holds at least max_len // L of them. Random lengths, worst orders included."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        max_len, longest = 64, int(torch.randint(1, 65, (1,), generator=generator))
        count = int(torch.randint(1, 40, (1,), generator=generator))
        lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
        if trial % 3 == 0:  # alternating long and short: the order that wastes the most room
            lengths = sorted(lengths)[::2] + sorted(lengths)[1::2][::-1]
        rows = pack_rows([random_sample(n) for n in lengths], max_len, packing=True)
        per_row = max_len // max(lengths)
        assert len(rows) <= -(-count // per_row), (lengths, [len(r) for r in rows])


def test_positions_restart_and_documents_are_numbered_per_row():
    batch = collate([random_sample(3), random_sample(2), random_sample(4)], max_len=5, packing=True)
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
    assert batch.labels[1, 4] == IGNORE


def test_packed_batch_gives_the_same_per_document_loss_as_documents_alone():
    model = build_model(preset("tiny"), "cpu", seed=1)
    samples = [random_sample(n) for n in (6, 11, 4, 9)]
    packed = collate(samples, max_len=32, packing=True)
    assert packed.input_ids.shape[0] == 1  # all four share one row
    logits = model(packed.input_ids, position_ids=packed.position_ids, doc_ids=packed.doc_ids)
    token_loss = F.cross_entropy(logits.flatten(0, 1), packed.labels.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(packed.labels.shape)
    start = 0
    for sample in samples:
        end = start + len(sample)
        alone = collate([sample], max_len=32, packing=True)
        _, parts = sft_loss(model, alone, StepTokens(1, []))
        torch.testing.assert_close(token_loss[0, start:end].sum(), parts["loss_sum"], rtol=1e-5, atol=1e-5)
        start = end


def test_packing_without_document_mask_would_differ():
    """The mask matters: plain causal attention over the packed row changes later documents' losses."""
    model = build_model(preset("tiny"), "cpu", seed=1)
    samples = [random_sample(n) for n in (6, 11)]
    packed = collate(samples, max_len=32, packing=True)
    masked = model(packed.input_ids, position_ids=packed.position_ids, doc_ids=packed.doc_ids)
    leaky = model(packed.input_ids, position_ids=packed.position_ids)
    torch.testing.assert_close(masked[:, :6], leaky[:, :6])
    assert not torch.allclose(masked[:, 6:], leaky[:, 6:])


def test_sft_loss_normalises_by_the_step_token_count():
    model = build_model(preset("tiny"), "cpu", seed=1)
    samples = [random_sample(n) for n in (6, 11, 4)]
    whole = collate(samples, 64, True)
    total = StepTokens.of(samples, 0)
    assert total.main == whole.num_loss_tokens
    loss_all, _ = sft_loss(model, whole, total)
    parts = [sft_loss(model, collate([s], 64, True), total)[0] for s in samples]
    torch.testing.assert_close(sum(parts), loss_all, rtol=1e-5, atol=1e-6)
