"""A reward model: the causal LM's trunk plus a scalar head read at the last token of each sequence."""

from __future__ import annotations

import torch
from torch import nn

from polytrain.models.config import ModelConfig
from polytrain.models.transformer import CausalLM


class RewardModel(CausalLM):
    """CausalLM + `score_head` (hidden -> 1). Starting weights load into everything but the head."""

    extra_parameters = ("score_head.weight",)

    def __init__(self, config: ModelConfig) -> None:
        if config.is_v4:
            raise ValueError("reward models are built on DeepSeek-V3-style models for now")
        super().__init__(config)
        self.score_head = nn.Linear(config.hidden_size, 1, bias=False)

    def reward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, last_index: torch.Tensor,
               doc_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar reward [B] of each row, read at `last_index` [B] (the last real token). token_mask: False on
        padding (kept out of the expert load)."""
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, token_mask=token_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score_head(hidden[rows, last_index]).squeeze(-1).float()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        super().init_weights(seed)
        generator = torch.Generator(device=self.score_head.weight.device).manual_seed((seed or 0) + 1)
        self.score_head.weight.normal_(0.0, self.config.initializer_range, generator=generator)


def build_reward_model(config: ModelConfig, device: torch.device | str, seed: int | None = 0) -> RewardModel:
    with torch.device(device):
        model = RewardModel(config)
    if torch.device(device).type != "meta":
        model.init_weights(seed)
    return model
