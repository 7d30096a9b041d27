"""Turning a rank's samples into device batches the active layout accepts (packed or padded rows; widths rounded
for sequence parallelism; one fixed shape for pipeline stages)."""

from __future__ import annotations

import torch

from polytrain.data.dataset import Sample
from polytrain.data.packing import Batch, collate, concat


class BatchMaker:
    def __init__(self, max_len: int, packing: bool, micro_batch_size: int, width_multiple: int,
                 device: torch.device) -> None:
        self.max_len, self.packing, self.rows = max_len, packing, micro_batch_size
        self.width_multiple, self.device = width_multiple, device

    def micro(self, samples: list[Sample]) -> Batch:
        """One micro-batch, its width rounded for sequence parallelism."""
        return collate(samples, self.max_len, self.packing, width_multiple=self.width_multiple).to(self.device)

    def pipeline(self, micro_batches: list[list[Sample]]) -> Batch:
        """Every micro-batch padded to the same [micro_batch_size, max_len] shape, stacked (pipelines need one
        shape); `Batch.rows` takes micro-batch i back out."""
        parts = [collate(m, self.max_len, self.packing, fixed_rows=self.rows) for m in micro_batches]
        return concat(parts).to(self.device)
