"""The Objective interface the trainer drives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polytrain.errors import ConfigError
from polytrain.models.transformer import build_model

if TYPE_CHECKING:
    from polytrain.train.trainer import Trainer


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Objective:
    """One algorithm. Items are whatever the algorithm trains on (tokenised conversations, preference pairs,
    prompts); each optimizer step takes `train.global_batch_size` of them in the loader's order.

    Per step the trainer calls `step_items` (the global step's items), `begin_step` (global normalisers, and for RL
    the rollouts), then `forward_backward` on this rank's share, sums the returned `sum_keys` over ranks and asks
    `stats` for the numbers to log (which must include "loss"; the guard watches it).
    """

    name = "objective"
    sum_keys: tuple[str, ...] = ("loss_sum",)
    supports_pipeline = False
    watch_loss_spikes = True
    """Whether the guard's loss-spike check applies (non-finite checks always do)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.config = trainer.config
        self.train_items: list[Any] = []
        self.eval_items: list[Any] | None = None

    # ---------------------------------------------------------------------------------------------- set-up
    def check_layout(self, dp: int) -> None:
        """Fail early when the step's items cannot be split over `dp` ranks and micro-batches."""
        train = self.config.train
        if train.global_batch_size % (dp * train.micro_batch_size):
            raise ConfigError(
                f"train.global_batch_size = {train.global_batch_size} must be a multiple of data-parallel ranks x "
                f"train.micro_batch_size = {dp} x {train.micro_batch_size}"
            )

    def load_data(self) -> None:
        raise NotImplementedError

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} train items{eval_part}"

    def build_model(self, device: torch.device) -> nn.Module:
        return build_model(self.config.model, device, seed=self.config.run.seed)

    def after_parallelize(self, model: nn.Module) -> None:
        """Hook once the policy is sharded (build a reference model, a rollout engine, ...)."""

    # ------------------------------------------------------------------------------------------------ steps
    def step_items(self, step: int) -> list[Any]:
        return [self.train_items[i] for i in self.trainer.loader.next_step()]

    def begin_step(self, step: int, items: list[Any]) -> Any:
        """Anything computed from the whole global step before the rank's micro-batches (e.g. token counts)."""
        return None

    def my_share(self, items: list[Any]) -> list[Any]:
        """This data-parallel rank's contiguous share of the step's items."""
        per_rank = len(items) // self.trainer.runtime.dp_size
        start = self.trainer.runtime.dp_rank * per_rank
        return items[start : start + per_rank]

    def forward_backward(self, model: nn.Module, items: list[Any], ctx: Any, factor: float) -> torch.Tensor:
        """Gradients of this rank's items, micro-batch by micro-batch; returns the local sums of `sum_keys`
        followed by the number of tokens processed."""
        sums = torch.zeros(len(self.sum_keys) + 1, dtype=torch.float64)
        for micro in chunks(items, self.config.train.micro_batch_size):
            with self.trainer.autocast():
                loss, parts, tokens = self.loss(model, micro, ctx)
            (loss * factor).backward()
            for i, key in enumerate(self.sum_keys):
                sums[i] += float(parts.get(key, 0.0)) * factor
            sums[-1] += tokens
        return sums

    def loss(self, model: nn.Module, micro: list[Any], ctx: Any) -> tuple[torch.Tensor, dict[str, Any], int]:
        """(loss to backpropagate, detached sums for logging, tokens processed) of one micro-batch."""
        raise NotImplementedError

    def stats(self, sums: dict[str, float], ctx: Any) -> dict[str, float]:
        raise NotImplementedError

    def can_stop_after(self, step: int) -> bool:
        """Whether a checkpoint after `step` captures everything (RL: only between rollouts)."""
        return True

    def end_step(self, step: int) -> None:
        """After the optimizer step (e.g. push weights to a rollout engine)."""

    # ------------------------------------------------------------------------------------------------- eval
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
