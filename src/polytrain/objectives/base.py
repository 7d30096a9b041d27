"""The Objective interface the trainer drives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polytrain.data.packing import Batch
from polytrain.errors import ConfigError
from polytrain.models.common.decoder import TrainOutput
from polytrain.models.registry import build_model
from polytrain.objectives.context import ObjectiveContext
from polytrain.splits import batch_problems

if TYPE_CHECKING:
    from polytrain.config import JobConfig


@dataclass(frozen=True)
class Metric:
    """A logged number an objective is judged by: shown on the console and plotted (`key` of its `stats`; the
    `eval_<key>` record, when there is one, is drawn beside it)."""

    key: str
    label: str
    fmt: str = ".4f"

    def format(self, value: float) -> str:
        return f"{self.label} {value:{self.fmt}}"


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Objective:
    """One algorithm. Items are whatever the algorithm trains on (tokenised conversations, preference pairs,
    prompts); each optimizer step takes `train.global_batch_size` of them in the loader's order.

    Per step the trainer hands over the step's items (`takes_items`), calls `begin_step` (global normalisers, and for
    RL the rollouts), then `forward_backward` on this rank's share (`my_share`), sums the returned `sum_keys` over
    ranks and asks `stats` for the numbers to log (which must include "loss"; the guard watches it).

    A micro-batch's loss is `loss`; objectives whose loss is a function of the model's training outputs implement
    `inputs` and `loss_from_output` instead, and then run under pipeline parallelism too (`supports_pipeline`).
    """

    name = "objective"
    sum_keys: tuple[str, ...] = ("loss_sum",)
    supports_pipeline = False
    supports_context_parallel = False
    """Whether every sum the objective makes is a sum over tokens, so rows split over context-parallel ranks (each
    holding some of every row's tokens) give the same step."""
    train_outputs = False
    """Whether the loss reads the MTP hidden states and the balance loss (`DecoderLM.forward_train`), not just the
    final hidden states: pipeline stages then carry them to the last stage."""
    headline: tuple[Metric, ...] = (Metric("loss", "loss"),)
    """The numbers this objective is judged by, first on every console line, in TensorBoard's "headline" charts and
    in `loss.png`."""
    loss_label = "loss"
    """What `loss` is (the y axis of its plot)."""
    watch_loss_spikes = True
    """Whether the guard's loss-spike check applies (non-finite checks always do)."""
    items_split_into_micro_batches = True
    """Whether a step's `train.global_batch_size` items split into `micro_batch_size` micro-batches on every
    data-parallel rank (RL objectives count prompts and split completions instead: their `check_config` says)."""

    def __init__(self, ctx: ObjectiveContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.train_items: Sequence[Any] = []
        self.eval_items: Sequence[Any] | None = None

    # ---------------------------------------------------------------------------------------------- set-up
    @classmethod
    def check_config(cls, config: JobConfig, dp: int) -> None:
        """Fail early when the step's items cannot be split over `dp` ranks and micro-batches (called when the
        config is loaded, with dp = 1, and again by the trainer with the real layout)."""
        found = batch_problems(config.train.global_batch_size, config.train.micro_batch_size, dp)
        if found:
            raise ConfigError("; ".join(found))

    @classmethod
    def check_world(cls, config: JobConfig, world_size: int) -> None:
        """Fail early on settings that name ranks of the job (e.g. the rollout engine's) outside its world."""

    def load_data(self) -> None:
        raise NotImplementedError

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} train items{eval_part}"

    @classmethod
    def decodes_in_process(cls, config: JobConfig | None) -> bool:
        """Whether the job samples from the policy with the built-in engine (cached decoding, one token per forward:
        its rows cannot be split by sequence position). `config` None: the objective's default engine."""
        return False

    def pipeline_rows(self) -> int:
        """Rows of every pipeline micro-batch (pipelines need one shape): one per item, unless the loaded data
        bounds how many rows a micro-batch of packed items can fill (`SFTObjective`)."""
        return self.config.train.micro_batch_size

    def dry_run_items(self, count: int, generator: torch.Generator) -> list[Any]:
        """`count` made-up training items of the longest allowed length (`polytrain dryrun`: no data is read)."""
        raise ConfigError(f"polytrain dryrun does not cover {self.name} yet")

    def dry_run_step(self, items: list[Any], generator: torch.Generator) -> tuple[Any, list[Any]]:
        """(`begin_step`'s step context, this rank's share) of the first step on the made-up `items`."""
        return self.begin_step(0, items), self.my_share(items)

    def build_model(self, device: torch.device | str) -> nn.Module:
        return build_model(self.config.model, device, seed=self.config.run.seed)

    def after_parallelize(self, model: nn.Module) -> None:
        """Hook once the policy is sharded (build a reference model, a rollout engine, ...)."""

    # ------------------------------------------------------------------------------------------------ steps
    def takes_items(self, step: int) -> bool:
        """Whether step `step` consumes `train.global_batch_size` new items (RL: only at a rollout)."""
        return True

    def begin_step(self, step: int, items: list[Any] | None) -> Any:
        """Anything computed from the whole global step before the rank's micro-batches (e.g. token counts)."""
        return None

    def my_share(self, items: list[Any] | None) -> list[Any]:
        """This data-parallel rank's contiguous share of the step's items."""
        collectives = self.ctx.collectives
        per_rank = len(items) // collectives.dp_size
        start = collectives.dp_rank * per_rank
        return items[start : start + per_rank]

    def forward_backward(self, model: nn.Module, items: list[Any], step: Any, factor: float) -> torch.Tensor:
        """Gradients of this rank's items, micro-batch by micro-batch; returns the local sums of `sum_keys`
        followed by the number of tokens processed. `factor` scales the loss (1 but for fault injection)."""
        sums = torch.zeros(len(self.sum_keys) + 1, dtype=torch.float64)
        micro_batches = chunks(items, self.config.train.micro_batch_size)
        if self.ctx.pipeline is not None:
            batch = self.run_pipeline(model, micro_batches, step, sums, factor, train=True)
            sums[-1] += batch.num_tokens
            return sums
        for index, micro in enumerate(micro_batches):
            self.ctx.collectives.gradient_sync(model, last=index == len(micro_batches) - 1)
            with self.ctx.autocast():
                loss, parts, tokens = self.loss(model, micro, step)
            (loss * factor).backward()
            self.accumulate(sums, parts, factor)
            sums[-1] += tokens
        return sums

    def accumulate(self, sums: torch.Tensor, parts: dict[str, Any], weight: float = 1.0,
                   keys: tuple[str, ...] | None = None) -> None:
        """Add a micro-batch's logged parts, times `weight`, to `sums` (laid out as `keys`, default `sum_keys`)."""
        for i, key in enumerate(keys or self.sum_keys):
            sums[i] += float(parts.get(key, 0.0)) * weight

    def run_pipeline(self, model: nn.Module, micro_batches: list[list[Any]], step: Any, sums: torch.Tensor,
                     factor: float = 1.0, train: bool = True, weights: list[float] | None = None,
                     keys: tuple[str, ...] | None = None) -> Batch:
        """Run the micro-batches through the pipeline's stages (forward, and backward with `train`); the last stage
        calls `loss_from_output` on each and adds its parts (times `weights[i]`, default 1) to `sums` (laid out as
        `keys`, default `sum_keys`), which are then summed over the stages. Returns the stacked batch."""
        keys = keys or self.sum_keys
        batch = self.ctx.batches.pipeline([self.samples(m) for m in micro_batches])
        rows = self.ctx.batches.rows

        def loss_fn(output: TrainOutput, index: int) -> torch.Tensor:
            micro = batch.rows(index * rows, (index + 1) * rows)
            loss, parts, _ = self.loss_from_output(model.lm_head, output, micro, micro_batches[index], step)
            self.accumulate(sums, parts, factor * (weights[index] if weights is not None else 1.0), keys)
            return loss * factor

        with self.ctx.autocast():
            self.ctx.pipeline.run(batch.input_ids, batch.position_ids, batch.doc_ids, loss_fn, train=train,
                                  multi_document=batch.multi_document)
        self.ctx.collectives.pp_sum(sums[: len(keys)])
        return batch

    def loss(self, model: nn.Module, micro: list[Any], step: Any) -> tuple[torch.Tensor, dict[str, Any], int]:
        """(loss to backpropagate, detached sums for logging, tokens processed) of one micro-batch. By default: the
        model's forward on `inputs(micro)`, then `loss_from_output`."""
        batch = self.inputs(micro)
        doc_ids = batch.doc_ids if batch.multi_document else None
        token_mask = batch.doc_ids >= 0
        if self.train_outputs:
            output = model.forward_train(batch.input_ids, batch.position_ids, doc_ids, token_mask)
        else:
            output = TrainOutput(model.hidden_states(batch.input_ids, batch.position_ids, doc_ids,
                                                     token_mask=token_mask), [], None)
        return self.loss_from_output(model.lm_head, output, batch, micro, step)

    def samples(self, micro: list[Any]) -> list[Any]:
        """The token samples (`data.dataset.Sample`) a micro-batch of items becomes (pipeline batches stack them)."""
        raise NotImplementedError

    def inputs(self, micro: list[Any]) -> Batch:
        """The device batch of a micro-batch of items."""
        return self.ctx.batches.micro(self.samples(micro))

    def loss_from_output(self, head: nn.Module, output: TrainOutput, batch: Batch, micro: list[Any],
                         step: Any) -> tuple[torch.Tensor, dict[str, Any], int]:
        """The loss of one micro-batch from the model's outputs on it; `head` is the output head (`lm_head`)."""
        raise NotImplementedError

    def stats(self, sums: dict[str, float], step: Any) -> dict[str, float]:
        raise NotImplementedError

    def can_stop_after(self, step: int) -> bool:
        """Whether a checkpoint after `step` captures everything (RL: only between rollouts)."""
        return True

    def end_step(self, step: int) -> None:
        """After the optimizer step (e.g. push weights to a rollout engine)."""

    # ------------------------------------------------------------------------------------------------- eval
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def eval_share(self) -> tuple[list[Any], int]:
        """This data-parallel rank's eval items (every dp_size-th), and how many micro-batches every rank runs
        (the same count everywhere, so the collectives inside the forwards pair up; eval.max_batches caps it)."""
        collectives, mbs = self.ctx.collectives, self.config.train.micro_batch_size
        items = self.eval_items or []
        count = math.ceil(math.ceil(len(items) / collectives.dp_size) / mbs)
        if self.config.eval.max_batches:
            count = min(count, self.config.eval.max_batches)
        return items[collectives.dp_rank :: collectives.dp_size], count

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
