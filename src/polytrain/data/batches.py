"""Turning a rank's samples into device batches the active layout accepts (packed or padded rows; widths rounded
for sequence parallelism; one fixed shape for pipeline stages)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from polytrain.data.dataset import Sample
from polytrain.data.packing import Batch, collate, concat

if TYPE_CHECKING:
    from polytrain.models.common.context_split import ContextSplit


class BatchMaker:
    """`width_multiple`: row widths are rounded up to a multiple of it (sequence parallelism splits positions
    evenly). `split`: with context parallelism, each batch keeps this rank's chunks of every row (widths are then
    also a multiple of 2 x cp)."""

    def __init__(self, max_len: int, packing: bool, micro_batch_size: int, width_multiple: int,
                 device: torch.device, split: ContextSplit | None = None) -> None:
        self.max_len, self.packing, self.rows = max_len, packing, micro_batch_size
        self.split = split
        if split is not None:
            width_multiple = math.lcm(width_multiple, 2 * split.size)
        self.width_multiple, self.device = width_multiple, device

    def micro(self, samples: list[Sample], packing: bool | None = None) -> Batch:
        """One micro-batch, its width rounded for sequence and context parallelism (`packing`: instead of the
        job's data.packing, e.g. one sequence per row for per-sequence losses)."""
        packing = self.packing if packing is None else packing
        batch = collate(samples, self.max_len, packing, width_multiple=self.width_multiple)
        if self.split is not None:
            batch = batch.context_local(self.split)
        return batch.to(self.device)

    def pipeline(self, micro_batches: list[list[Sample]]) -> Batch:
        """Every micro-batch padded to the same [rows, max_len] shape, stacked (pipelines need one shape; `rows`:
        micro_batch_size, or fewer where the objective's data bounds its packed rows: `Objective.pipeline_rows`);
        `Batch.rows` takes micro-batch i back out."""
        parts = [collate(m, self.max_len, self.packing, fixed_rows=self.rows) for m in micro_batches]
        batch = concat(parts)
        if self.split is not None:
            batch = batch.context_local(self.split)
        return batch.to(self.device)
