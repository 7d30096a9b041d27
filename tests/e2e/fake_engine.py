"""An in-process stand-in for an external rollout server (vLLM / vllm-ascend), used by the GRPO engine test.

It owns a separate copy of the model that only changes through `update_weights`, exactly like a server would, and
saves every weight update it receives to $FAKE_ENGINE_OUT so the test can compare it with the trained policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from polytrain.config import JobConfig
from polytrain.models import build_model
from polytrain.rollout.engine import Completion
from polytrain.rollout.generate import SamplingConfig, sample


class FakeEngine:
    def __init__(self, config: JobConfig) -> None:
        self.model = build_model(config.model, "cpu", seed=1234).eval()  # not the policy's weights until synced
        self.updates = 0

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        tokens, finished = sample(self.model, prompts, sampling, stop_ids, row_seeds=row_seeds)
        return [Completion(t, f) for t, f in zip(tokens, finished)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        state = dict(named_tensors)
        self.model.load_state_dict(state)
        self.updates += 1
        torch.save({"updates": self.updates, "state": state}, os.environ["FAKE_ENGINE_OUT"])
