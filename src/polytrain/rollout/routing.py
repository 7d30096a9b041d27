"""MoE routing replay (R3): record which experts each token used while sampling, and force the same experts when
the trainer recomputes that token's log-probability, so sampler and trainer score the same computation.

Recording happens in the routers (`Router.routing_record`); this module turns the per-forward records of a batched,
left-padded, KV-cached generation into per-sample tensors, and per-sample tensors back into a training batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from polytrain.models.common.moe import Router


def routers_of(model: nn.Module) -> list[Router]:
    """The routers of the main forward, in layer order (MTP modules do not run while sampling)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, Router) and not name.startswith(("mtp.", "_orig_mod.mtp."))]


class RoutingRecorder:
    """Arms every router of `model` to record; `per_sample` collects and disarms."""

    def __init__(self, model: nn.Module) -> None:
        self.routers = routers_of(model)
        for router in self.routers:
            router.routing_record = []

    def per_sample(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[torch.Tensor]]:
        """For each sample, per MoE layer, the experts of its prompt tokens and of every completion token but the
        last ([len(prompt) + len(completion) - 1, k]: exactly the training input of prompt + completion)."""
        longest = max(len(p) for p in prompts)
        batch = len(prompts)
        out: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        for router in self.routers:
            records = router.routing_record or []
            router.routing_record = None
            prefill = records[0].view(batch, longest, -1)
            steps = records[1:]
            for i, (prompt, completion) in enumerate(zip(prompts, completions)):
                parts = [prefill[i, longest - len(prompt) :]]
                parts += [steps[j].view(batch, -1)[i : i + 1] for j in range(max(len(completion) - 1, 0))]
                out[i].append(torch.cat(parts))
        return out


def batch_routing(per_sample: list[list[torch.Tensor]], width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, (experts [R * width, k], known [R * width]) for rows right-padded to `width`."""
    layers = len(per_sample[0])
    out = []
    for layer in range(layers):
        k = per_sample[0][layer].shape[-1]
        experts = torch.zeros(len(per_sample), width, k, dtype=torch.long)
        known = torch.zeros(len(per_sample), width, dtype=torch.bool)
        for row, sample in enumerate(per_sample):
            length = min(sample[layer].shape[0], width)
            experts[row, :length] = sample[layer][:length]
            known[row, :length] = True
        out.append((experts.flatten(0, 1), known.flatten()))
    return out


@contextlib.contextmanager
def replayed(model: nn.Module, routing: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Iterator[None]:
    """Force the recorded experts for the duration of one forward (and its backward recomputation, if any)."""
    routers = routers_of(model) if routing is not None else []
    for router, override in zip(routers, routing or []):
        router.routing_override = override
    try:
        yield
    finally:
        for router in routers:
            router.routing_override = None
