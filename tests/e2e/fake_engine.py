"""An in-process stand-in for an external rollout server (vLLM / vllm-ascend), used by the GRPO engine test.

It owns a separate copy of the model that only changes through `update_weights`, exactly like a server would: the
weights arrive in Hugging Face names and layouts (one tensor per expert), bucket by bucket, and are loaded with the
family's name mapping. Every update it receives is saved to $FAKE_ENGINE_OUT (in polytrain's names) so the test can
compare it with the trained policy. It scores the sync check's probe batch as a server would.
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


def _read(tensors: dict[str, torch.Tensor]):
    def read(hf_name: str, indices: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        out = tensors[hf_name]
        for dim, index in enumerate(indices):
            out = out.index_select(dim, index)
        return out

    return read


class FakeEngine:
    weight_dtype = torch.float32  # exact comparison with the trainer's fp32 weights

    def __init__(self, config: JobConfig) -> None:
        self.model = build_model(config.model, "cpu", seed=1234).eval()  # not the policy's weights until synced
        self.updates = 0
        self.generated: list[int] = []  # rows asked for, per call

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: set[int],
                 record_routing: bool = False, row_seeds: list[int] | None = None) -> list[Completion]:
        self.generated.append(len(prompts))
        logprobs: list[list[float]] = []
        tokens, finished = sample(self.model, prompts, sampling, stop_ids, row_seeds=row_seeds, logprobs=logprobs)
        return [Completion(t, f, logprobs=lp) for t, f, lp in zip(tokens, finished, logprobs)]

    @torch.no_grad()
    def probe_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The sync check's probe (objectives/rollout.py check_sync): log p of every token after the first."""
        out = []
        for ids in sequences:
            logp = torch.log_softmax(self.model(torch.tensor([ids]))[0].float(), dim=-1)
            out.append(logp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist())
        return out

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        hf, largest = {}, 0
        for bucket in buckets:
            largest = max(largest, sum(t.numel() * t.element_size() for _, t in bucket))
            hf.update((name, tensor.clone()) for name, tensor in bucket)  # copies: no reference to the bucket
        names = names_for(self.model.config)
        with torch.no_grad():
            for name, dest in self.model.state_dict().items():
                if not (name == "lm_head.weight" and self.model.config.tie_word_embeddings):
                    names.load_into(name, dest, _read(hf))
        self.updates += 1
        torch.save({"updates": self.updates, "state": self.model.state_dict(), "hf_names": sorted(hf),
                    "largest_bucket": largest}, os.environ["FAKE_ENGINE_OUT"])
