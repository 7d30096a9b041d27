"""A reward model: any family's causal LM plus a scalar head read at the last token of each sequence."""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from polytrain.models.common.config import ModelConfig
from polytrain.models.common.decoder import DecoderLM
from polytrain.models.common.init import on_meta
from polytrain.models.registry import spec_for


class RewardHead:
    """Mixed into a family's model class: `score_head` (hidden -> 1) and `reward`. Starting weights load into
    everything but the head (`extra_parameters`)."""

    extra_parameters = ("score_head.weight",)
    entry_points = ("forward_train", "hidden_states", "reward")
    score_head: nn.Linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.score_head = nn.Linear(config.hidden_size, 1, bias=False)

    def reward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, last_index: torch.Tensor,
               doc_ids: torch.Tensor | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar reward [B] of each row, read at `last_index` [B] (the last real token). token_mask: False on
        padding (kept out of the expert load)."""
        # the class's method: `reward` is itself a sharding entry point (see DecoderLM.forward)
        hidden = type(self).hidden_states(self, input_ids, position_ids, doc_ids, token_mask=token_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.score_head(hidden[rows, last_index]).squeeze(-1).float()


@cache
def reward_model_class(model_class: type[DecoderLM]) -> type[DecoderLM]:
    return type(f"{model_class.__name__}Reward", (RewardHead, model_class), {})


def build_reward_model(config: ModelConfig, device: torch.device | str, seed: int | None = 0) -> DecoderLM:
    """The reward model of `config`'s family on `device`, initialised from `seed` (meta: uninitialised)."""
    with on_meta():
        model = reward_model_class(spec_for(config).model_class)(config)
    if torch.device(device).type != "meta":
        model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(seed)
    return model
