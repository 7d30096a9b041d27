"""Rollout engines: who samples the completions of an RL step.

`RolloutEngine` is the interface: `generate` returns one `Completion` per prompt (token ids including the stop token
when one was produced), and `update_weights` receives the policy's new weights after optimizer steps, in buckets of
Hugging Face tensors (an external server such as vLLM / vllm-ascend loads them; the built-in engine samples with the
policy itself and ignores them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from polytrain.rollout.generate import KeepGoing, SamplingConfig, alone, sample


@dataclass
class Completion:
    tokens: list[int]
    """Sampled ids, the stop token included when the completion ended with one."""
    finished: bool
    routing: list[torch.Tensor] | None = field(default=None)
    """Per MoE layer, the experts chosen for each token of prompt + completion [T, k] (routing replay)."""
    logprobs: list[float] | None = field(default=None)
    """The engine's log-prob of each sampled token (None when the engine does not report them)."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]: ...

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None: ...
    """Buckets of (Hugging Face name, tensor) in the engine's `weight_dtype` (default bfloat16), produced one at a
    time: consume each before asking for the next, and keep no reference to it."""


class BuiltinEngine:
    """Samples with the training policy's own KV-cache generator (so its weights are always current)."""

    def __init__(self, model: nn.Module, keep_going: KeepGoing = alone) -> None:
        self.model = model
        self.keep_going = keep_going

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        from polytrain.rollout.routing import RoutingRecorder

        recorder = RoutingRecorder(self.model) if record_routing else None
        tokens, finished = sample(self.model, prompts, sampling, stop_ids, keep_going=self.keep_going,
                                  row_seeds=row_seeds)
        routing = recorder.per_sample(prompts, tokens) if recorder is not None else [None] * len(prompts)
        return [Completion(t, f, r) for t, f, r in zip(tokens, finished, routing)]

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Nothing to do: the policy is the sampler."""


def full_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer; sharded (DTensor) ones are gathered (a collective)."""
    from torch.distributed.tensor import DTensor

    return [(name, t.full_tensor() if isinstance(t, DTensor) else t.detach())
            for name, t in model.state_dict().items()]
