"""ModelSpec: everything polytrain knows about one model family, in one object.

Code outside `models/<family>/` reaches a family only through its spec (looked up by `config.architecture` in
`polytrain.models.registry`): the config class and presets, building on any device (meta included), Hugging Face
names and config.json, the tensor-parallel plan, the planner's FLOP and activation hooks, and the features the
family lacks. Adding a family = a folder that builds one spec + one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from polytrain.models.common.config import ModelConfig
from polytrain.models.common.decoder import DecoderLM
from polytrain.models.common.init import on_meta


class HFFormat(Protocol):
    """A family's Hugging Face interop (see models/hf/)."""

    hf_class: str
    """`architectures[0]` of the release's config.json (its `model_type` is the spec's architecture)."""
    hf_reward_class: str | None
    """`architectures[0]` of an exported reward model: transformers' sequence-classification class of the family
    (its scalar head is `score.weight`); None where transformers has none."""
    keys: tuple[str, ...]
    """config.json keys copied one to one into the family's own config fields (the shared ones come on top)."""

    def names(self, config: ModelConfig) -> Any:
        """Tensor names both ways (a `models.hf.names.StackedExperts`)."""

    def read_config(self, hf: dict[str, Any], values: dict[str, Any], where: str) -> None:
        """Complete `values` (config fields read so far) from the family-specific parts of `hf`; ConfigError if
        something is unsupported."""

    def write_config(self, config: ModelConfig, out: dict[str, Any]) -> None:
        """Add the family-specific keys of a release-format config.json to `out`."""


class PlannerHooks(Protocol):
    """The family-specific parts of `polytrain plan`'s model (plan/flops.py, memory.py, timing.py)."""

    fused_attention: bool
    """Whether the family's attention in polytrain keeps no sequence x sequence matrix for backward (a fused,
    flash-style kernel); False: it materialises the scores, as a reference implementation does."""

    executes_model_flops: bool
    """Whether the fused attention multiplies only what the architecture defines (a flash kernel skipping masked
    tiles); False: it also multiplies masked entries, counted by `attention_flops(..., dense=True)`."""

    def attention_flops(self, config: ModelConfig, layer: int, seq_len: int, dense: bool) -> tuple[float, float]:
        """Forward FLOPs per token of layer `layer`'s attention: (projections, scores + context). dense: as
        polytrain's attention code multiplies them, masked products included (what torch's FLOP counter sees)."""

    def layer_extra_flops(self, config: ModelConfig) -> float:
        """Forward FLOPs per token and layer outside attention and MLP (e.g. hyper-connections)."""

    def head_extra_flops(self, config: ModelConfig) -> float:
        """Forward FLOPs per token between the last layer and the output head (e.g. a hyper head)."""

    def mtp_join_flops(self, config: ModelConfig) -> float:
        """Forward FLOPs per token with which one MTP module joins the state and the next token's embedding."""

    def attention_activation_bytes(self, config: ModelConfig, layer: int, seq_len: int, b: int, fused: bool,
                                   tp: int, norm: Callable[[float], float], cp: int = 1) -> float:
        """Bytes per token autograd keeps in layer `layer` besides its MLP / MoE (attention, its norms, and
        anything around the residual stream), with `b` bytes per element; `norm(d)`: one RMSNorm of width d.
        seq_len: the tokens a rank holds of each row; cp > 1: of a row cp times as long (context parallelism: what
        the family gathers of the whole row and keeps)."""

    def attention_backward_bytes(self, config: ModelConfig, layer: int, seq_len: int, b: int, fused: bool,
                                 tp: int, cp: int = 1) -> float:
        """Bytes per token layer `layer`'s attention backward allocates beyond what its forward keeps (the
        gradients of materialised scores; under context parallelism what it recomputes of the whole row); 0 for a
        fused kernel without context parallelism."""

    def context_gather_width(self, config: ModelConfig, layer: int) -> tuple[int, int]:
        """Elements per token layer `layer` exchanges under context parallelism: (all-gathered in forward, of
        those, the ones whose gradient is reduce-scattered back in backward)."""

    def residual_width(self, config: ModelConfig) -> int:
        """Elements per token of the residual state between layers (what pipeline stages send)."""

    def kv_width(self, config: ModelConfig) -> int:
        """Elements per token and layer a KV cache holds (and context parallelism exchanges)."""


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    """The family's name: `model.architecture`, and the `model_type` of its Hugging Face config.json."""
    description: str
    config_class: type[ModelConfig]
    model_class: type[DecoderLM]
    presets: dict[str, dict[str, Any]]
    hf: HFFormat
    planner: PlannerHooks
    tensor_parallel: Callable[[DecoderLM, bool], list[tuple[nn.Module, dict[str, Any]]]] | None = None
    """(model, sequence_parallel) -> [(module, its `parallelize_module` plan)], outermost first; None: the family
    has no tensor-parallel plan yet."""
    sequence_parallel: bool = True
    """Its tensor-parallel plan can also split the residual stream by sequence position (parallel.sequence_parallel);
    False: tp > 1 runs only with parallel.sequence_parallel = false."""
    context_parallel: bool = False
    """Its attention runs with each row split over context-parallel ranks (parallel/context.py)."""
    supports_packing: bool = True
    """Several documents per row (data.packing) with attention kept inside each."""

    def build(self, config: ModelConfig, device: torch.device | str = "meta", seed: int | None = 0) -> DecoderLM:
        """The model of `config` on `device`, initialised from `seed` (None: allocated, weights left to be loaded;
        on the meta device nothing is allocated). Built on the meta device first, so the values are those a
        sharded model gets (DecoderLM.init_weights)."""
        with on_meta():
            model = self.model_class(config)
        if torch.device(device).type != "meta":
            model.to_empty(device=device)
            model.tie_weights()
            model.init_weights(seed)
        return model
