"""Rollout engines: who samples the completions of an RL step.

`RolloutEngine` is the interface: `generate` returns one `Completion` per prompt (token ids including the stop token
when one was produced, and the engine's log-probability of each), and `update_weights` receives the policy's new
weights after optimizer steps (an external server such as vLLM / vllm-ascend reloads them; the built-in engine
samples with the policy itself and ignores them).

Weights arrive as a stream of buckets (parallel/weight_sync.py): lists of (Hugging Face name, tensor) in the
release's layout (one tensor per routed expert) and in the engine's `weight_dtype`, built one at a time; an engine
copies what it needs from a bucket and keeps no reference to it, so a sync never holds more than one bucket. Only
ranks whose engine says `receives_weights` get the tensors (e.g. the one rank that pushes to a shared server);
every rank still takes part in building them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from polytrain.rollout.generate import KeepGoing, SamplingConfig, alone, sample

Bucket = list[tuple[str, torch.Tensor]]
"""(Hugging Face name, tensor) pairs: one bucket of a weight sync."""


@dataclass
class Completion:
    tokens: list[int]
    """Sampled ids, the stop token included when the completion ended with one."""
    finished: bool
    routing: list[torch.Tensor] | None = field(default=None)
    """Per MoE layer, the experts chosen for each token of prompt + completion [T, k] (routing replay)."""
    logprobs: list[float] | None = field(default=None)
    """The engine's log-probability of each sampled token (before temperature / top-p), when it reports them:
    what the train / rollout mismatch correction compares the trainer's with."""


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]: ...

    def update_weights(self, buckets: Iterable[Bucket]) -> None: ...


def receives_weights(engine: RolloutEngine) -> bool:
    """Whether this rank's engine takes weight updates (default: yes)."""
    return bool(getattr(engine, "receives_weights", True))


def weight_dtype(engine: RolloutEngine) -> torch.dtype:
    """The dtype the engine serves (default bf16); the release's fp32 tensors stay fp32."""
    return getattr(engine, "weight_dtype", torch.bfloat16)


class BuiltinEngine:
    """Samples with the training policy's own KV-cache generator (so its weights are always current).

    `decoding` (default: one process) is entered around each rollout; it yields the KeepGoing of the sampler and
    may hold the sharded weights gathered for the rollout's duration (ObjectiveContext.collectives.decoding)."""

    def __init__(self, model: nn.Module, decoding: Callable[[], AbstractContextManager[KeepGoing]] | None = None
                 ) -> None:
        self.model = model
        self.decoding = decoding or (lambda: nullcontext(alone))

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        from polytrain.rollout.routing import RoutingRecorder

        recorder = RoutingRecorder(self.model) if record_routing else None
        logprobs: list[list[float]] = []
        with self.decoding() as keep_going:
            tokens, finished = sample(self.model, prompts, sampling, stop_ids, keep_going=keep_going,
                                      row_seeds=row_seeds, logprobs=logprobs)
        routing = recorder.per_sample(prompts, tokens) if recorder is not None else [None] * len(prompts)
        return [Completion(t, f, r, lp) for t, f, r, lp in zip(tokens, finished, routing, logprobs)]

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Nothing to do: the policy is the sampler."""
