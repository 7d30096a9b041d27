"""The fused, chunked output-head loss equals the plain one (loss and both gradients) and never keeps logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polytrain.models.common import output_head
from polytrain.models.common.output_head import IGNORE, OutputHead, chunk_rows, fused_linear_cross_entropy


def inputs(tokens: int = 37, hidden: int = 16, vocab: int = 50, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::5] = IGNORE
    return h, w, labels


def reference(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 1, 4 * 50 * 8, 2**30], ids=["1-row", "8-rows", "one-chunk"])
def test_fused_loss_and_gradients_match_plain_cross_entropy(chunk_bytes):
    h, w, labels = inputs()
    expected = reference(h, w, labels)
    (2.5 * expected).backward()
    want_h, want_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    got = fused_linear_cross_entropy(h, w, labels, chunk_bytes)
    (2.5 * got).backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, want_w, rtol=1e-5, atol=1e-5)


def test_fused_loss_under_bf16_autocast_is_close_to_fp32():
    h, w, labels = inputs(tokens=64, hidden=32, vocab=80)
    expected = reference(h, w, labels)
    expected.backward()
    want_w = w.grad.clone()
    w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(h, w, labels, 4 * 80 * 16)
    got.backward()
    assert got.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=0)
    assert (w.grad - want_w).norm() / want_w.norm() < 2e-2


def test_fused_loss_with_bf16_parameters_is_close_to_fp32():
    """bf16 weights and hidden states without autocast: the GEMMs write bf16 gradients into place, in chunks."""
    h, w, labels = inputs(tokens=64, hidden=32, vocab=80)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (h, w))
    expected = reference(h16.detach().float().requires_grad_(), w16.detach().float(), labels)
    got = fused_linear_cross_entropy(h16, w16, labels, 4 * 80 * 16)
    got.backward()
    assert got.dtype == torch.float32 and w16.grad.dtype == h16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)
    h_ref, w_ref = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    reference(h_ref, w_ref, labels).backward()
    for got_grad, want in ((h16.grad, h_ref.grad), (w16.grad, w_ref.grad)):
        assert (got_grad.float() - want).norm() / want.norm() < 2e-2


def test_fused_loss_keeps_no_logits_for_backward():
    """autograd saves no tensor of the fused loss; the plain path keeps the [N, V] logits."""
    h, w, labels = inputs(tokens=40, hidden=8, vocab=300)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_linear_cross_entropy(h, w, labels, 4 * 300 * 8)
    assert saved == []  # its gradients, [N, H] and [V, H], are computed in forward and handed over in backward
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(h, w, labels)
    assert (40, 300) in saved  # the check above can fail


def test_output_head_plain_and_fused_paths_agree_and_chunk_size_follows_the_vocabulary():
    head = OutputHead(16, 50)
    torch.nn.init.normal_(head.weight)
    h, _, labels = inputs()
    fused = head.loss_sum(h.view(1, 37, 16), labels.view(1, 37))
    head.fused = False
    plain = head.loss_sum(h.view(1, 37, 16), labels.view(1, 37))
    torch.testing.assert_close(fused, plain)
    assert chunk_rows(129280) == 519 and chunk_rows(10**12) == 1


def test_no_grad_needed_computes_only_the_loss():
    h, w, labels = inputs()
    with torch.no_grad():
        got = fused_linear_cross_entropy(h, w, labels, 4 * 50 * 4)
    torch.testing.assert_close(got, reference(h, w, labels).detach())


@pytest.mark.parametrize("ignored", [True, False], ids=["some-ignored", "all-labelled"])
def test_chunked_label_logprobs_match_log_softmax_with_gradients(monkeypatch, ignored):
    head = OutputHead(16, 50)
    torch.nn.init.normal_(head.weight)
    h, _, labels = inputs()
    if not ignored:
        labels = labels.clamp(min=0)
    h3, labels3 = h.view(1, 37, 16), labels.view(1, 37)
    weights = torch.randn(1, 37)
    expected = torch.log_softmax(h3 @ head.weight.t(), -1).gather(-1, labels3.clamp(min=0)[..., None])[..., 0]
    expected = expected.masked_fill(labels3 == IGNORE, 0.0)
    (expected * weights).sum().backward()
    want_h, want_w = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    monkeypatch.setattr(output_head, "CHUNK_BYTES", 4 * 50 * 5)  # 5 rows per chunk: 8 chunks
    got = head.label_logprobs(h3, labels3)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, want_w, rtol=1e-5, atol=1e-5)


def test_head_skips_positions_without_a_label():
    """Half the labels ignored: the same loss and gradients as the plain head, with half the head's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    head = OutputHead(16, 50)
    torch.nn.init.normal_(head.weight)
    h, _, labels = inputs(tokens=40)
    labels[:20] = IGNORE
    counter = FlopCounterMode(display=False)
    with counter:
        fused = head.loss_sum(h, labels)
    fused.backward()
    want = 3 * 2 * int((labels != IGNORE).sum()) * 16 * 50  # logits, hidden gradient, weight gradient
    assert counter.get_total_flops() == want
    got_h, got_w = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    reference(h, head.weight, labels).backward()
    torch.testing.assert_close(fused, reference(h, head.weight, labels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, head.weight.grad, rtol=1e-5, atol=1e-5)


def test_label_logprobs_of_no_positions_is_empty():
    head = OutputHead(16, 50)
    h, _, labels = inputs()
    assert head.label_logprobs(h[:0].view(1, 0, 16), labels[:0].view(1, 0)).shape == (1, 0)


@pytest.mark.parametrize("split", [False, True])
def test_the_gradient_buffers_are_released_after_backward_while_the_loss_lives_on(split):
    """A pipeline schedule keeps every micro-batch's loss until the end of the step: the node must not keep its
    [V, H] weight-gradient buffer that long (on DeepSeek-V3's last stage of 16, 16 micro-batches kept 55 GiB).
    Zero-bubble schedules run the backward twice (input, then weight gradients): both calls get the gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (12,))
    token = output_head.SPLIT_BACKWARD.set(split)
    try:
        loss = fused_linear_cross_entropy(hidden, weight, labels)
    finally:
        output_head.SPLIT_BACKWARD.reset(token)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=split)
    if split:
        assert loss.grad_fn.grads[1] is not None  # kept for the second (weight) call
        second = torch.autograd.grad(loss, (hidden, weight))
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert loss.grad_fn.grads == [None, None]
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), labels, reduction="sum"), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(first, expected))
