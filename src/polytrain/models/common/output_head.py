"""The output head (hidden -> vocabulary logits) and its cross-entropy fused, chunk by chunk.

With DeepSeek's 129,280-token vocabulary the logits of one 4K sequence are 0.5 billion numbers: 2 GiB in fp32, and
autograd keeps them plus their gradient. `OutputHead.loss_sum` never holds more than one chunk of logits (at most
`CHUNK_BYTES` of fp32): for each chunk it computes the logits, the log-sum-exp and the loss, and right away the
chunk's gradients (softmax - one-hot, times the weight and the hidden states), which backward only scales. The
memory is one chunk instead of the whole sequence twice. Positions without a label (prompts, padding) are dropped
before the head: in SFT on chat data that skips a large share of the model's largest matmul.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # polytrain.data.dataset.IGNORE: no loss on this token
CHUNK_BYTES = 256 * 2**20
SPLIT_BACKWARD = contextvars.ContextVar("split_backward", default=False)
"""True while a zero-bubble pipeline schedule runs (parallel/pp.py): it may run a node's backward twice, for the
input gradients and then for the weight gradients."""


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most `chunk_bytes` (default CHUNK_BYTES)."""
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, labels); gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        # one dtype throughout: the GEMMs write into preallocated memory (no fresh [rows, V] tensor per chunk, whose
        # first touch costs as much as the GEMM itself on a CPU host)
        direct = hidden.dtype == weight.dtype == dtype
        # one fp32 buffer for every chunk, updated in place: logits -> log-softmax -> softmax -> its gradient
        buffer = torch.empty((min(rows, hidden.shape[0]), weight.shape[0]), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            valid = y != IGNORE
            target = y.clamp(min=0).unsqueeze(1)
            logits = buffer[: h.shape[0]]
            if direct and dtype == torch.float32:
                torch.mm(h, weight.t(), out=logits)
            else:
                logits.copy_(F.linear(h, weight))
            logp = torch.log_softmax(logits, 1, out=logits)
            total -= (logp.gather(1, target).squeeze(1) * valid).sum()
            if not (want_hidden or want_weight):
                continue
            grad = logp.exp_()  # d CE / d logits = softmax - one_hot, zero on ignored tokens
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            if not bool(valid.all()):
                grad[~valid] = 0
            grad = grad.to(dtype)
            if want_hidden:
                if direct:
                    torch.mm(grad, weight, out=grad_hidden[start : start + rows])
                else:
                    grad_hidden[start : start + rows] = grad @ weight.to(dtype)
            if want_weight:
                if grad_weight is None:
                    grad_weight = (grad.t() @ h.to(dtype)).to(weight.dtype)
                elif direct:
                    grad_weight.addmm_(grad.t(), h)
                else:
                    grad_weight += grad.t() @ h.to(dtype)
        if want_weight and grad_weight is None:  # no tokens at all
            grad_weight = torch.zeros_like(weight)
        # kept as attributes, not saved tensors: backward hands them over (scaled in place), so autograd can adopt
        # the [V, H] weight gradient as .grad instead of copying it
        ctx.grads = [grad_hidden, grad_weight]
        ctx.scale = None
        # Released after the last backward call: a pipeline schedule keeps each micro-batch's loss (and so this node)
        # until the end of the step, which would keep a [V, H] gradient buffer per micro-batch alive.
        ctx.calls_left = 2 if SPLIT_BACKWARD.get() else 1
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        # A split backward (zero-bubble pipeline schedules: input gradients first, weight gradients later) runs this
        # node twice with the same incoming gradient: the buffers are scaled once and handed over both times.
        scale = grad_total.float()
        if ctx.scale is None:
            for g in ctx.grads:
                if g is not None:
                    g.mul_(scale.to(g.dtype))
            ctx.scale = scale
        elif not torch.equal(scale, ctx.scale):
            raise RuntimeError("the fused output-head loss was backpropagated twice with different gradients (its "
                               "gradient buffers are scaled in place)")
        grads = ctx.grads
        ctx.calls_left -= 1
        if ctx.calls_left <= 0:
            ctx.grads = [None, None]
        return (*grads, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_bytes: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden` [N, H] @ `weight` [V, H].T against `labels` [N] (IGNORE = no loss), in fp32,
    without materialising more than `chunk_bytes` of logits."""
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_rows(weight.shape[0], chunk_bytes))


class OutputHead(nn.Linear):
    """nn.Linear(hidden, vocab, bias=False) with a fused-loss method. Sharding wrappers that gather parameters
    around `forward` must register `loss_sum` too (FSDP: `register_fsdp_forward_method`)."""

    component = "output_head"

    fused: bool = True
    """Off: the plain path (full logits in fp32, then cross-entropy), e.g. to compare memory."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of hidden states [..., H] against labels [...] (IGNORE = no loss)."""
        # a tensor-parallel (DTensor) weight takes the plain path through forward (and its sharding hooks)
        if self.fused and not isinstance(self.weight, DTensor):
            flat, flat_labels, _ = _trained_rows(hidden, labels)
            return fused_linear_cross_entropy(flat, self.weight, flat_labels)
        return F.cross_entropy(self(hidden).float().flatten(0, -2), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")

    def label_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) per position, shaped like `labels` (0 where IGNORE), in fp32: what preference and RL
        losses are built from. Chunked like `loss_sum`; with gradients, each chunk's logits are recomputed in
        backward (activation checkpointing of the head), so no more than one chunk of logits is alive."""
        if not self.fused or isinstance(self.weight, DTensor):
            return _gather_logprobs(self(hidden), labels)
        flat, flat_labels, scored = _trained_rows(hidden, labels)
        rows = chunk_rows(self.weight.shape[0])
        pieces = []
        for start in range(0, flat.shape[0], rows):
            h, y = flat[start : start + rows], flat_labels[start : start + rows]
            if torch.is_grad_enabled() and (h.requires_grad or self.weight.requires_grad):
                pieces.append(checkpoint(self._chunk_logprobs, h, y, use_reentrant=False))
            else:
                pieces.append(self._chunk_logprobs(h, y))
        if scored is None and pieces:  # every position has a label
            return torch.cat(pieces).view(labels.shape)
        out = torch.zeros(labels.numel(), dtype=torch.float32, device=labels.device)
        if pieces:
            out = out.index_put((scored,), torch.cat(pieces))
        return out.view(labels.shape)

    def _chunk_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _gather_logprobs(F.linear(hidden, self.weight), labels)


def _trained_rows(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The hidden states [M, H] and labels [M] of the positions that have a label, and their flat indices (None when
    every position has one): the head never computes the logits of prompt or padding positions (in SFT on chat
    data, often half the tokens)."""
    flat, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    trained = flat_labels != IGNORE
    if bool(trained.all()):
        return flat, flat_labels, None
    rows = trained.nonzero().squeeze(1)
    return flat.index_select(0, rows), flat_labels.index_select(0, rows), rows


def _gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == IGNORE, 0.0)
