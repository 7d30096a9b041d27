"""The output head (hidden -> vocabulary logits) and its cross-entropy fused, chunk by chunk.

With DeepSeek's 129,280-token vocabulary the logits of one 4K sequence are 0.5 billion numbers: 2 GiB in fp32, and
autograd keeps them plus their gradient. `OutputHead.loss_sum` never holds more than one chunk of logits (at most
`CHUNK_BYTES` of fp32): for each chunk it computes the logits, the log-sum-exp and the loss, and right away the
chunk's gradients (softmax - one-hot, times the weight and the hidden states), which backward only scales. The
FLOPs are those of the unfused head; the memory is one chunk instead of the whole sequence twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

IGNORE = -100  # polytrain.data.dataset.IGNORE: no loss on this token
CHUNK_BYTES = 256 * 2**20


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take at most `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of CE(hidden @ weight.T, labels); gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows], labels[start : start + rows]
            valid = y != IGNORE
            target = y.clamp(min=0).unsqueeze(1)
            logits = F.linear(h, weight).float()
            lse = logits.logsumexp(dim=-1)
            total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
            if not (want_hidden or want_weight):
                continue
            # d CE / d logits = softmax - one_hot, zero on ignored tokens; reuse the logits buffer
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad.scatter_add_(1, target, -torch.ones_like(target, dtype=grad.dtype))
            grad.mul_(valid.unsqueeze(1))
            grad = grad.to(h.dtype if not torch.is_autocast_enabled(h.device.type) else
                           torch.get_autocast_dtype(h.device.type))
            if want_hidden:
                grad_hidden[start : start + rows] = grad @ weight.to(grad.dtype)
            if want_weight:
                grad_weight += (grad.t() @ h.to(grad.dtype)).to(grad_weight.dtype)
        # kept as attributes, not saved tensors: backward hands them over (scaled in place), so autograd can adopt
        # the [V, H] weight gradient as .grad instead of copying it
        ctx.grads = [grad_hidden, grad_weight]
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused output-head loss was backpropagated twice (its gradients are consumed)")
        scale = grad_total.float()
        return (*(None if g is None else g.mul_(scale.to(g.dtype)) for g in grads), None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Summed cross-entropy of `hidden` [N, H] @ `weight` [V, H].T against `labels` [N] (IGNORE = no loss), in fp32,
    without materialising more than `chunk_bytes` of logits."""
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_rows(weight.shape[0], chunk_bytes))


class OutputHead(nn.Linear):
    """nn.Linear(hidden, vocab, bias=False) with a fused-loss method. Sharding wrappers that gather parameters
    around `forward` must register `loss_sum` too (FSDP: `register_fsdp_forward_method`)."""

    fused: bool = True
    """Off: the plain path (full logits in fp32, then cross-entropy), e.g. to compare memory."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of hidden states [..., H] against labels [...] (IGNORE = no loss)."""
        # a tensor-parallel (DTensor) weight takes the plain path through forward (and its sharding hooks)
        if self.fused and not isinstance(self.weight, DTensor):
            return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, labels.reshape(-1))
        return F.cross_entropy(self(hidden).float().flatten(0, -2), labels.reshape(-1), ignore_index=IGNORE,
                               reduction="sum")
