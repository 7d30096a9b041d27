"""A deterministic, resumable sample order.

The order is a pure function of (seed, epoch): epoch e visits the dataset in `randperm(n, seed + e)` order. A
run's position is the number of samples consumed so far (a global sample index), so the same samples come next
after a resume whatever the number of processes.
"""

from __future__ import annotations

import torch


class SampleOrder:
    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm = torch.arange(num_samples)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_samples, generator=generator)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Dataset indices of global sample positions start, start+1, ..., start+count-1."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_samples)
            out.append(int(self._permutation(epoch)[offset]))
        return out


class StepLoader:
    """Hands out the samples of each optimizer step: `global_batch_size` consecutive positions of the order.

    `state_dict()` is just the position, so resuming on a different number of ranks continues exactly.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, shuffle: bool = True) -> None:
        self.order = SampleOrder(num_samples, seed, shuffle)
        self.global_batch_size = global_batch_size
        self.position = 0
        self.skipped: set[int] = set()
        """Positions of global batches never to train on (batches that tripped the guard before a rollback)."""

    def next_step(self) -> list[int]:
        while self.position in self.skipped:
            self.position += self.global_batch_size
        indices = self.order.indices(self.position, self.global_batch_size)
        self.position += self.global_batch_size
        return indices

    @property
    def epoch(self) -> float:
        return self.position / self.order.num_samples

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.order.seed, "num_samples": self.order.num_samples,
                "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.skipped |= set(state.get("skipped", []))
