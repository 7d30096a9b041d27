"""How a model sees context parallelism: its rows hold this rank's load-balanced causal chunks of each sequence
(`ContextSplit`), its attention gathers keys over the whole row, its masks work in whole-row positions.
`polytrain.parallel.context` says why the split is laid out so and what is gathered; it sets `context_split` on a
model's modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ContextSplit:
    """This rank's place in a context-parallel group of `size` ranks."""

    size: int
    rank: int
    group: dist.ProcessGroup | None = None

    def chunks(self) -> tuple[int, int]:
        """The two chunk indices (of 2 x size) this rank holds."""
        return self.rank, 2 * self.size - 1 - self.rank

    def positions(self, width: int, device: torch.device | None = None) -> torch.Tensor:
        """Column indices (of a full row of `width`) of the tokens this rank holds, in the order it holds them."""
        chunk = self.chunk_width(width)
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in self.chunks()])

    def chunk_width(self, width: int) -> int:
        if width % (2 * self.size):
            raise ValueError(f"a row of {width} tokens does not split into 2 x cp = {2 * self.size} equal chunks")
        return width // (2 * self.size)

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-width tensor (dimension `dim` is the sequence)."""
        chunk = self.chunk_width(x.shape[dim])
        return torch.cat([x.narrow(dim, c * chunk, chunk) for c in self.chunks()], dim=dim)

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row sums of the whole rows from each rank's partial sums (e.g. a sequence's log-probability);
        differentiable, see `_SumOverRanks`."""
        return x if self.size == 1 else _SumOverRanks.apply(x, self.group)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full row from every rank's local tokens, in sequence order (differentiable: the gradient of each
        rank's part is the sum over ranks)."""
        if self.size == 1:
            return x
        return _GatherSequence.apply(x, dim, self)


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over the context-parallel ranks. Backward: the gradient passes through unchanged, because
    every rank computes the same function of the sum and each rank's part reaches the loss only through its own
    copy (the data-parallel gradient reduction then adds the ranks' contributions once each)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    # torch 2.13 renamed the single-tensor collectives (the old names warn); polytrain accepts torch >= 2.9
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, tensor, group=group)


def _reduce_scatter(output: torch.Tensor, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, tensor, group=group)


def to_sequence_order(stacked: torch.Tensor, split: ContextSplit, dim: int) -> torch.Tensor:
    """[cp, ...local...] as gathered (rank j holds chunks j, 2cp-1-j) -> the full tensor in sequence order."""
    halves = [part.chunk(2, dim=dim) for part in stacked.unbind(0)]
    order = [halves[c][0] if c < split.size else halves[2 * split.size - 1 - c][1] for c in range(2 * split.size)]
    return torch.cat(order, dim=dim)


def to_rank_order(full: torch.Tensor, split: ContextSplit, dim: int) -> torch.Tensor:
    """The inverse of `to_sequence_order`: [cp, ...local...], rank j's tokens at index j."""
    chunks = full.chunk(2 * split.size, dim=dim)
    return torch.stack([torch.cat([chunks[j], chunks[2 * split.size - 1 - j]], dim=dim) for j in range(split.size)])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, split: ContextSplit) -> torch.Tensor:
        ctx.dim, ctx.split = dim, split
        x = x.contiguous()
        # concatenated along the first dimension (the one output form every backend takes), then viewed stacked
        stacked = x.new_empty((split.size * x.shape[0], *x.shape[1:]))
        _all_gather(stacked, x, group=split.group)
        return to_sequence_order(stacked.view(split.size, *x.shape), split, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        split = ctx.split
        per_rank = to_rank_order(grad, split, ctx.dim).contiguous()
        mine = per_rank.new_empty(per_rank.shape[1:])
        _reduce_scatter(mine, per_rank.flatten(0, 1), group=split.group)
        return mine, None, None


def context_mask(split: ContextSplit, local_width: int, doc_ids: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Boolean attention mask [B or 1, 1, local_width, full width] (True = may attend) of this rank's queries over
    the whole row: causal in global positions, and within the query's own document when `doc_ids` (local [B, T])
    separates packed documents."""
    width = local_width * split.size
    q_pos = split.positions(width, device)[:, None]
    k_pos = torch.arange(width, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if doc_ids is not None:
        keys = split.gather(doc_ids)
        mask = mask & (doc_ids[:, None, :, None] == keys[:, None, None, :])
    return mask | (k_pos == q_pos)[None, None]
