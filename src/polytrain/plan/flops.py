"""Training FLOPs per token of a model, split by part, from the same ModelConfig the models use (each family's
attention and extra work come from its spec's planner hooks, e.g. models/deepseek_v4/planner.py).

Conventions (the ones Megatron-LM's `num_floating_point_operations` and the DeepSeek-V3 figure of ~250 GF/token
use, so the numbers compare):
- a matrix product [m, k] x [k, n] costs 2 * m * n * k FLOPs; one token through a linear layer costs 2 * weights;
- training = forward + backward = 3 x forward (backward computes the input and the weight gradients);
- causal attention: query i attends to i keys; the average over the positions of a sequence of `seq_len` tokens
  is taken as seq_len / 2 (Megatron's convention) for full attention; sparse attention is counted as the
  architecture defines it (the family's `attention_flops`);
- elementwise work (norms, activations, softmax, RoPE, pooling, routing top-k) is left out: it is memory-bound and
  under 1% of the matrix FLOPs of the released models;
- activation recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).

`attention="dense"` instead counts every query against every key, as a masked full matrix product computes it;
that is what a FLOP counter on a reference attention sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from polytrain.models.common.config import ModelConfig
from polytrain.models.registry import spec_for

TRAIN_FACTOR = 3  # forward + backward (input gradient + weight gradient)

PARTS = ("attention_projections", "attention_core", "dense_mlp", "moe_routed", "moe_shared", "router",
         "hyper_connections", "mtp", "vocab_head")


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per token by part (MTP modules counted whole under `mtp`, their output head included)."""

    attention_projections: float
    attention_core: float
    dense_mlp: float
    moe_routed: float
    moe_shared: float
    router: float
    hyper_connections: float
    mtp: float
    vocab_head: float

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in PARTS)

    @property
    def linear(self) -> float:
        """Everything but the attention scores / context products (weights x activations)."""
        return self.total - self.attention_core

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _swiglu(dim: int, hidden: int) -> float:
    return 2 * 3 * dim * hidden


@dataclass(frozen=True)
class _Layer:
    attention_projections: float
    attention_core: float
    mlp_dense: float
    moe_routed: float
    moe_shared: float
    router: float
    hyper_connections: float

    @property
    def total(self) -> float:
        return (self.attention_projections + self.attention_core + self.mlp_dense + self.moe_routed
                + self.moe_shared + self.router + self.hyper_connections)


def _layer(c: ModelConfig, layer: int, seq_len: int, dense: bool) -> _Layer:
    h = c.hidden_size
    planner = spec_for(c).planner
    proj, core = planner.attention_flops(c, layer, seq_len, dense)
    hyper = planner.layer_extra_flops(c)
    if not c.is_moe_layer(layer):
        return _Layer(proj, core, _swiglu(h, c.intermediate_size), 0.0, 0.0, 0.0, hyper)
    return _Layer(proj, core, 0.0, c.num_experts_per_tok * _swiglu(h, c.moe_intermediate_size),
                  _swiglu(h, c.moe_intermediate_size * c.n_shared_experts), 2 * h * c.n_routed_experts, hyper)


def flops_per_token(config: ModelConfig, seq_len: int, *, mtp: bool = True,
                    attention: Literal["causal", "dense"] = "causal") -> Flops:
    """Training FLOPs per token (3 x forward) of `config` on sequences of `seq_len` tokens, by part.

    `mtp`: include the model's multi-token-prediction modules (as trained); `attention`: see the module docstring.
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    dense = attention == "dense"
    c, h = config, config.hidden_size
    layers = [_layer(c, i, seq_len, dense) for i in range(c.num_hidden_layers)]
    head = 2 * h * c.vocab_size
    planner = spec_for(c).planner
    hyper_head = planner.head_extra_flops(c)
    mtp_flops = 0.0
    if mtp:
        for k in range(c.num_nextn_predict_layers):
            block = _layer(c, c.num_hidden_layers + k, seq_len, dense).total
            mtp_flops += planner.mtp_join_flops(c) + block + head
    forward = Flops(
        attention_projections=sum(x.attention_projections for x in layers),
        attention_core=sum(x.attention_core for x in layers),
        dense_mlp=sum(x.mlp_dense for x in layers),
        moe_routed=sum(x.moe_routed for x in layers),
        moe_shared=sum(x.moe_shared for x in layers),
        router=sum(x.router for x in layers),
        hyper_connections=sum(x.hyper_connections for x in layers) + hyper_head,
        mtp=mtp_flops,
        vocab_head=head,
    )
    return Flops(**{name: TRAIN_FACTOR * getattr(forward, name) for name in PARTS})
