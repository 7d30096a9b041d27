"""An in-process stand-in for an external rollout server (vLLM / vllm-ascend), used by the GRPO engine test.

It owns a separate copy of the model that only changes through `update_weights`, exactly like a server would: the
weights arrive as buckets of Hugging Face tensors (fp32, so exact), and its state is saved after every update to
$FAKE_ENGINE_OUT so the test can compare it with the trained policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from polytrain.config import JobConfig
from polytrain.models import build_model
from polytrain.models.hf.names import names_for
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

    weight_dtype = torch.float32  # the weights arrive exactly as trained

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        received: dict[str, torch.Tensor] = {}
        for bucket in buckets:
            received.update((name, tensor.clone()) for name, tensor in bucket)

        def read(hf_name: str, indices: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
            tensor = received[hf_name]
            for dim, index in enumerate(indices):
                tensor = tensor.index_select(dim, index)
            return tensor

        names, config = names_for(self.model.config), self.model.config
        with torch.no_grad():
            for name, dest in self.model.state_dict().items():
                if not (name == "lm_head.weight" and config.tie_word_embeddings):
                    names.load_into(name, dest, read)
        self.updates += 1
        torch.save({"updates": self.updates, "state": self.model.state_dict()}, os.environ["FAKE_ENGINE_OUT"])
