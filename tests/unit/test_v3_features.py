"""DeepSeek-V3 features beyond the foundation: MTP, the sequence-wise balance loss, YaRN."""

from __future__ import annotations

import math

import torch

from polytrain.algorithms.sft import StepTokens, mtp_labels, sft_loss
from polytrain.data.dataset import IGNORE, Sample
from polytrain.data.packing import Batch, collate
from polytrain.models import build_model, preset
from polytrain.models.common.moe import sequence_balance_loss
from polytrain.models.common.rope import rope_parameters, yarn_mscale


def test_mtp_labels_shift_within_documents_only():
    labels = torch.tensor([[10, 11, 12, 20, 21, IGNORE]])
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    batch = Batch(labels, labels, torch.zeros_like(labels), doc_ids, 2)
    assert mtp_labels(batch, 1).tolist() == [[11, 12, IGNORE, 21, IGNORE, IGNORE]]
    assert mtp_labels(batch, 2).tolist() == [[12, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_mtp_loss_trains_the_mtp_module_and_is_weighted():
    model = build_model(preset("tiny-v3", aux_loss_alpha=0.0), "cpu", seed=0)
    samples = [Sample(torch.randint(0, 100, (12,)), torch.randint(0, 100, (12,))) for _ in range(2)]
    batch = collate(samples, 64, packing=True)
    tokens = StepTokens.of(samples, 1)
    assert tokens.mtp == [22]  # each sample loses its first label for depth 1
    loss_without, parts = sft_loss(model, batch, tokens, mtp_weight=0.0)
    loss_with, _ = sft_loss(model, batch, tokens, mtp_weight=0.3)
    mtp_mean = float(parts["mtp_loss_sum"]) / 22
    assert math.isclose(float((loss_with - loss_without).detach()), 0.3 * mtp_mean, rel_tol=1e-4)
    loss_with.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_sequence_balance_loss_matches_the_formula():
    scores = torch.rand(2 * 5, 4)
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 1], [0, 1]] * 2)
    loss = sequence_balance_loss(scores, indices, rows=2, alpha=0.5)
    expected = 0.0
    for row in range(2):
        s = scores[row * 5 : (row + 1) * 5]
        s = s / s.sum(-1, keepdim=True)
        idx = indices[row * 5 : (row + 1) * 5]
        f = torch.tensor([(idx == e).sum().item() * 4 / (2 * 5) for e in range(4)])
        expected += float((f * s.mean(0)).sum())
    assert math.isclose(float(loss), 0.5 * expected / 2, rel_tol=1e-5)


def test_balance_loss_only_in_training_and_only_when_enabled():
    model = build_model(preset("tiny-v3"), "cpu", seed=0)
    tokens = torch.randint(0, 100, (2, 16))
    assert model.forward_train(tokens).aux_loss is not None
    model.eval()
    assert model.forward_train(tokens).aux_loss is None
    plain = build_model(preset("tiny-v3", aux_loss_alpha=0.0), "cpu", seed=0)
    assert plain.forward_train(tokens).aux_loss is None


def test_yarn_keeps_high_frequencies_and_scales_low_ones():
    config = preset("tiny-v3")
    plain, _, _ = rope_parameters(config, 16, 10000.0, scaled=False)
    scaled, cos_factor, softmax_factor = rope_parameters(config, 16, 10000.0)
    assert torch.isclose(scaled[0], plain[0])  # fastest rotation untouched
    assert torch.isclose(scaled[-1], plain[-1] / config.yarn_factor)  # slowest interpolated by the factor
    assert cos_factor == 1.0  # mscale == mscale_all_dim
    assert math.isclose(softmax_factor, yarn_mscale(config.yarn_factor, 1.0) ** 2)
