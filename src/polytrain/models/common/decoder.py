"""DecoderLM: what every model family is to the rest of polytrain.

A causal LM here is: an embedding into a residual state, decoder blocks that update the state, a projection of the
state to final hidden states (the output head's input), the output head, and optional multi-token-prediction (MTP)
modules after the last block. A family implements the hooks (how its state looks, what its blocks take); the
generic methods below, the losses, generation and pipeline stages use nothing else, so none of them branches on
the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polytrain.models.common.config import ModelConfig
from polytrain.models.common.init import InitRule, LocalIndices, full_indices, initialize, reset_buffers, shared_rule
from polytrain.models.common.moe import Router
from polytrain.models.common.output_head import OutputHead


@dataclass
class TrainOutput:
    hidden: torch.Tensor
    """Final hidden states [B, T, hidden] of the main model (the output head's input)."""
    mtp_hidden: list[torch.Tensor]
    """Per MTP depth k (1-based position k-1): hidden states [B, T, hidden] predicting token i+k+1."""
    aux_loss: torch.Tensor | None
    """Sum of the MoE layers' sequence-wise balance losses (None when disabled)."""


def shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x[:, i] <- x[:, i + k], with `fill` in the last k columns."""
    out = torch.full_like(x, fill)
    out[:, :-k] = x[:, k:]
    return out


def aux_loss_sum(modules: list[nn.Module]) -> torch.Tensor | None:
    """The summed balance losses the routers among `modules` (and their children) left in their last forward,
    taken from them: a router holding its loss would keep that forward's autograd graph alive after backward."""
    routers = [m for module in modules for m in module.modules() if isinstance(m, Router) and m.aux_loss is not None]
    losses = [m.aux_loss for m in routers]
    for m in routers:
        m.aux_loss = None
    return torch.stack(losses).sum() if losses else None


class DecoderLM(nn.Module):
    """Base class of every family's model. Submodules every family has: `embed_tokens`, `layers`, `lm_head`, `mtp`.

    Hooks a family implements:
    - `layer_inputs(input_ids, position_ids, doc_ids, token_mask, cache, valid)`: whatever its blocks take besides
      the state (rotary tables, masks, ...), computed once per forward (and once per pipeline stage);
    - `embed(input_ids)` -> the residual state; `state_shape(rows, width)` its shape (pipeline stages send it);
    - `run_block(block, state, inputs)` -> the new state;
    - `head_input(state)` -> final hidden states [B, T, hidden];
    - `run_mtp(module, previous, next_embeddings, inputs, depth)` -> (state for the next depth, hidden states);
    - `end_of_layers(inputs)`: after the last block (e.g. commit a KV cache);
    - `stage_modules(first, last)`: the modules besides decoder layers a pipeline stage holds;
    - `init_rule(module, name)` for its own module types, and `new_cache(batch, max_len)` where
      `supports_kv_cache`.
    """

    supports_kv_cache = False
    supports_routing_replay = False
    """Whether the routing its KV-cached sampler records lines up with the left-padded prompts (rollout/routing.py)."""
    context_split: Any = None
    """With context parallelism (`parallel/context.py`), the model's rows hold this rank's chunks of each sequence:
    masks and MTP shifts then work in whole-row positions."""
    entry_points: tuple[str, ...] = ("forward_train", "hidden_states")
    """Methods besides `forward` that callers run the model through (sharding wrappers gather parameters around
    each of them)."""
    config: ModelConfig
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    lm_head: OutputHead
    mtp: nn.ModuleList

    # ------------------------------------------------------------------------------------------ family hooks
    def layer_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None,
                     token_mask: torch.Tensor | None, cache: Any = None, valid: torch.Tensor | None = None) -> Any:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_shape(self, rows: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def run_block(self, block: nn.Module, state: torch.Tensor, inputs: Any) -> torch.Tensor:
        raise NotImplementedError

    def head_input(self, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_mtp(self, module: nn.Module, previous: torch.Tensor, next_embeddings: torch.Tensor, inputs: Any,
                depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def end_of_layers(self, inputs: Any) -> None:
        """After the last block of a forward (default: nothing)."""

    def stage_modules(self, first: bool, last: bool) -> dict[str, nn.Module]:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no KV cache")

    def init_rule(self, module: nn.Module, name: str) -> InitRule | None:
        """How tensor `name` of `module` starts (models/common/init.py); a family adds its own modules' rules."""
        return shared_rule(module, name, self.config.initializer_range)

    @torch.no_grad()
    def tie_weights(self) -> None:
        """With tie_word_embeddings, make the output head use the embedding's weight (again: moving a model off
        the meta device gives every plain parameter a new object)."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.embed_tokens.weight:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int | None = 0, local_indices: LocalIndices = full_indices) -> None:
        """Recompute derived buffers and, with a seed, fill every parameter and persistent buffer by its rule, as a
        function of (seed, name, global index) only: sharded or whole, the model starts with the same values.
        `local_indices` says which global elements a (sharded) tensor holds here."""
        reset_buffers(self)
        if seed is not None:
            initialize(self, seed, self.init_rule, local_indices)

    # --------------------------------------------------------------------------------------------- generic
    def run_layers(self, state: torch.Tensor, inputs: Any, layers: list[nn.Module] | nn.ModuleList) -> torch.Tensor:
        for layer in layers:
            state = self.run_block(layer, state, inputs)
        return state

    def mtp_embeddings(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per MTP depth k: the embedding of token i+k at position i (what MTP module k combines with the state)."""
        split = self.context_split
        if split is None:
            return [self.embed_tokens(shift_left(input_ids, k, 0)) for k in range(1, len(self.mtp) + 1)]
        whole = split.gather(input_ids)
        return [self.embed_tokens(split.local(shift_left(whole, k, 0))) for k in range(1, len(self.mtp) + 1)]

    def mtp_hidden(self, state: torch.Tensor, embeddings: list[torch.Tensor], inputs: Any) -> list[torch.Tensor]:
        """The hidden states of every MTP depth, each depth starting from the previous one's state."""
        out = []
        previous = state
        for depth, (module, embedded) in enumerate(zip(self.mtp, embeddings), start=1):
            previous, hidden = self.run_mtp(module, previous, embedded, inputs, depth)
            out.append(hidden)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: Any = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of the main model for `input_ids` [B, T].

        position_ids [B, T]: rotary positions (restart at 0 per packed document); defaults to 0..T-1 after the cache.
        doc_ids [B, T]: document of each token when several are packed in one row (training).
        cache / valid [B, T]: incremental decoding; `valid` marks real tokens (False = left padding).
        token_mask [B, T]: False on padding, which then never counts in the expert load (training).
        """
        # the class's method, not the instance's: a sharding wrapper that gathers parameters around the entry point
        # `hidden_states` would otherwise run a second time inside this forward, and on leaving it mark the
        # outer forward finished (FSDP then frees the root's parameters after every forward)
        hidden = type(self).hidden_states(self, input_ids, position_ids, doc_ids, cache, valid, token_mask)
        return self.lm_head(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: Any = None,
        valid: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states [B, T, hidden] (what the output head multiplies)."""
        inputs = self.layer_inputs(input_ids, position_ids, doc_ids, token_mask, cache, valid)
        state = self.run_layers(self.embed(input_ids), inputs, self.layers)
        self.end_of_layers(inputs)
        return self.head_input(state)

    def forward_train(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> TrainOutput:
        """Everything a training loss needs: main hidden states, MTP hidden states and the balance loss.
        token_mask [B, T] (False on padding) keeps padding out of the expert load and the balance loss."""
        inputs = self.layer_inputs(input_ids, position_ids, doc_ids, token_mask)
        state = self.run_layers(self.embed(input_ids), inputs, self.layers)
        mtp_hidden = self.mtp_hidden(state, self.mtp_embeddings(input_ids), inputs)
        return TrainOutput(self.head_input(state), mtp_hidden, aux_loss_sum([self]))
