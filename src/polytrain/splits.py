"""How a step's items split over data-parallel ranks and micro-batches: the rule the config loader, the trainer,
the objectives and the planner share (a leaf module: every package may import it)."""

from __future__ import annotations


def batch_problems(global_batch: int, micro_batch: int, dp: int) -> list[str]:
    """Whether a step's `global_batch` items split into whole micro-batches on every data-parallel rank."""
    if global_batch % (dp * micro_batch):
        return [f"train.global_batch_size = {global_batch} must be a multiple of data-parallel ranks x "
                f"train.micro_batch_size = {dp} x {micro_batch}"]
    return []
