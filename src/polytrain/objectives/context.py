"""ObjectiveContext: everything an objective may use of the job around it, and nothing more.

The trainer builds one per run. An objective never sees the trainer, the optimizer, the checkpointer or the process
groups: it reads the config, makes batches, runs forwards under the job's autocast, sums over data-parallel ranks
through `collectives`, drives the pipeline (when the layout has one) with its own loss, and asks for frozen models
(a reference, teachers) laid out like the policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from polytrain.data.batches import BatchMaker
from polytrain.data.chat import Template
from polytrain.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from polytrain.config import JobConfig
    from polytrain.parallel.pp import Pipeline


class Collectives(Protocol):
    """This process's place among the data-parallel ranks, and the few reductions objectives need."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int

    def dp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks, in place (any dtype; placed as the backend needs)."""

    def pp_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over pipeline stages, in place (losses exist on the last stage only)."""

    def any_rank(self, flag: bool) -> bool:
        """Whether any rank passes `flag` (e.g. still has rows to decode)."""

    def gradient_sync(self, model: nn.Module, last: bool) -> None:
        """Before a micro-batch's backward: whether it is the step's last (data-parallel gradient reduction)."""

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable `obj`, in rank order (all ranks of the job, not only data-parallel ones)."""

    def scatter_objects(self, objs: list[object] | None, src: int) -> object:
        """Rank r receives `objs[r]` of rank `src`."""

    def broadcast_object(self, obj: object, src: int) -> object:
        """Rank `src`'s `obj` on every rank."""

    def decoding(self, model: nn.Module, weights: str = "auto") -> AbstractContextManager[Callable[[bool], bool]]:
        """Around a rollout: FSDP weights gathered once for all its decoding steps (gathered; auto when they fit)
        or layer by layer per step (sharded); yields the sampler's KeepGoing (rollout/generate.py)."""

    def weight_buckets(self, model: nn.Module, dtype: torch.dtype, bucket_bytes: int,
                       receives: bool) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The model's weights in Hugging Face names and layouts, one bucket of at most `bucket_bytes` at a time,
        assembled on the ranks that pass `receives` (others get empty buckets); every rank iterates to the end."""


@dataclass
class ObjectiveContext:
    config: JobConfig
    device: torch.device
    tokenizer: Tokenizer
    template: Template
    batches: BatchMaker
    collectives: Collectives
    autocast: Callable[[], AbstractContextManager]
    """The job's autocast (run.precision) for forward passes."""
    warn: Callable[[str], None]
    info: Callable[[str], None]
    reference_model: Callable[[], nn.Module]
    """The run's starting weights (init.hf_path / init.from_run, or the seeded initialisation) as a frozen model
    laid out like the policy, in eval mode: the reference of preference and RL losses."""
    frozen_run_model: Callable[[str], tuple[JobConfig, nn.Module, int]]
    """(config, frozen model laid out like the policy, step) of another run's newest checkpoint (e.g. a teacher)."""
    rollouts: bool = True
    """Whether the job samples rollouts (false in the dry run, which runs the update step on made-up rollouts and
    starts no rollout engine)."""
    run_dir: Path | None = None
    """The run directory (set once the trainer has checked and written it)."""
    pipeline: Pipeline | None = None
    """The pipeline when parallel.pp > 1 (set once the model is parallelised): `run` drives its stages with the
    objective's loss function."""
