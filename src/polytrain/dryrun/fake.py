"""The pieces that let the real engine run one training step of a real-size job in one CPU process: a fake world
of N ranks, tensors without storage, placeholder values where code reads a number out of a tensor, and balanced
expert routing where expert parallelism needs split sizes.

- `fake_world(world, rank)`: torch's "fake" process-group backend at the real world size. Collectives return at
  once without moving data, so every rank's code path runs (meshes, FSDP, expert and pipeline parallelism) for the
  rank chosen.
- placeholders (`tracking.StepObserver`): under FakeTensorMode a tensor has a shape but no values; reading a
  number out of one (loss sums for logging, gradient norms, the pipeline schedule's vote on static shapes) gives
  1 (1.0, True: every position trained, no data-dependent selection), and `torch.equal` gives True. Shapes never
  come from them: they come from the data, which the dry run makes, and from the routing below. Agreement between
  ranks (`ParallelRuntime.all_agree`) is this rank's own verdict: every rank of a fake world is this one.
- `BalancedAllToAll`: expert parallelism's token exchange with every rank sending every other rank the same number
  of rows (the routing the aux-loss-free balancing steers towards), since the routing itself has no values.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from polytrain.parallel.ep import AllToAllDispatch


@contextlib.contextmanager
def fake_world(world: int, rank: int) -> Iterator[None]:
    """A fake default process group of `world` ranks, as rank `rank`; the launcher's environment as torchrun sets
    it (restored afterwards)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {key: os.environ.get(key) for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _even(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class BalancedAllToAll(AllToAllDispatch):
    """Expert parallelism with the same number of rows between every pair of ranks and for every expert."""

    def exchange_counts(self, counts: torch.Tensor, local_experts: int) -> tuple[torch.Tensor, list[int], list[int]]:
        splits = _even(self._rows, self.ep)
        per_expert = torch.tensor([_even(split, local_experts) for split in splits], dtype=counts.dtype,
                                  device=counts.device)
        return per_expert, splits, splits

    def receive_order(self, received_counts: torch.Tensor, total: int) -> torch.Tensor:
        return torch.arange(total, device=received_counts.device)

    def __call__(self, experts: nn.Module, x: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        self._rows = indices.numel()  # tokens x top-k routed rows leave this rank
        return super().__call__(experts, x, weights, indices)


def balance_expert_routing(model: nn.Module) -> int:
    """Replace every expert-parallel dispatcher of `model` by its balanced twin; returns how many."""
    from polytrain.models.common.moe import GroupedExperts

    count = 0
    for module in model.modules():
        if isinstance(module, GroupedExperts) and isinstance(module.dispatcher, AllToAllDispatch):
            module.dispatcher = BalancedAllToAll(module.dispatcher.group, module.dispatcher.ep)
            count += 1
    return count
