"""Training FLOPs per token of a DeepSeek-V3 / V4 model, split by part, from the same ModelConfig the models use.

Conventions (the ones Megatron-LM's `num_floating_point_operations` and the DeepSeek-V3 figure of ~250 GF/token
use, so the numbers compare):
- a matrix product [m, k] x [k, n] costs 2 * m * n * k FLOPs; one token through a linear layer costs 2 * weights;
- training = forward + backward = 3 x forward (backward computes the input and the weight gradients);
- causal attention: query i attends to i keys; the average over the positions of a sequence of `seq_len` tokens
  is taken as seq_len / 2 (Megatron's convention) for full attention. DeepSeek-V4's attention is counted as the
  architecture defines it: the sliding window (min(i, window) keys), the compressed entries a query may see
  (HCA: all of its past windows; CSA: its top-k of them) and the lightning indexer's scores over the visible
  compressed entries;
- elementwise work (norms, activations, softmax, RoPE, pooling, routing top-k) is left out: it is memory-bound and
  under 1% of the matrix FLOPs of the released models;
- activation recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).

`attention="dense"` instead counts every query against every key, as polytrain's reference attention computes it
(a masked full matrix product); that is what a FLOP counter on the CPU model sees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from polytrain.models.config import ModelConfig

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


def _mean_min(seq_len: int, cap: int) -> float:
    """Mean over positions t = 1..seq_len of min(t, cap): keys a causal query sees under a window `cap`."""
    if seq_len <= cap:
        return (seq_len + 1) / 2
    return (cap * (cap + 1) / 2 + (seq_len - cap) * cap) / seq_len


def _mean_entries(seq_len: int, ratio: int, cap: int | None) -> float:
    """Mean over positions t = 1..seq_len of min(cap, t // ratio): compressed entries a query may see (a window
    of `ratio` tokens becomes visible once it lies wholly in the past)."""
    limit = seq_len if cap is None else min(seq_len, cap * ratio - 1)
    q, r = divmod(limit, ratio)
    below = ratio * q * (q - 1) / 2 + q * (r + 1)  # sum of t // ratio for t = 1..limit
    above = 0 if cap is None else max(0, seq_len - limit) * cap
    return (below + above) / seq_len


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


def _mla(c: ModelConfig, seq_len: int, dense: bool) -> tuple[float, float]:
    """Forward FLOPs per token of MLA: (projections, scores + context)."""
    heads, qk = c.num_attention_heads, c.qk_head_dim
    if c.q_lora_rank:
        q = c.hidden_size * c.q_lora_rank + c.q_lora_rank * heads * qk
    else:
        q = c.hidden_size * heads * qk
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * heads * (
        c.qk_nope_head_dim + c.v_head_dim)
    out = heads * c.v_head_dim * c.hidden_size
    keys = seq_len if dense else seq_len / 2
    return 2 * (q + kv + out), 2 * heads * (qk + c.v_head_dim) * keys


def _v4_attention(c: ModelConfig, layer: int, seq_len: int, dense: bool) -> tuple[float, float]:
    """Forward FLOPs per token of V4 hybrid attention (models/hybrid_attention.py): (projections, core)."""
    h, heads, d = c.hidden_size, c.num_attention_heads, c.head_dim
    proj = (h * c.q_lora_rank + c.q_lora_rank * heads * d + h * d  # q_a, q_b, shared kv
            + heads * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * h)  # grouped o_a, o_b
    ratio = c.compress_ratio(layer)
    csa = ratio == c.compress_ratio_csa
    if dense:
        keys = seq_len + (seq_len // ratio if ratio else 0)
    else:
        keys = _mean_min(seq_len, c.sliding_window)
        if ratio:
            keys += _mean_entries(seq_len, ratio, c.index_topk if csa else None)
    core = 2 * heads * d * 2 * keys  # scores q.k and context p.v (values are the keys)
    if ratio:
        proj += 2 * h * d * (2 if csa else 1)  # compressor kv_proj + gate_proj (two series when overlapping)
    if csa:
        n_idx, d_idx = c.index_n_heads, c.index_head_dim
        proj += 2 * h * 2 * d_idx + c.q_lora_rank * n_idx * d_idx + h * n_idx  # its compressor, q_b, weights
        visible = seq_len // ratio if dense else _mean_entries(seq_len, ratio, None)
        core += 2 * n_idx * d_idx * visible
    return 2 * proj, core


def _layer(c: ModelConfig, layer: int, seq_len: int, dense: bool) -> _Layer:
    h = c.hidden_size
    if c.is_v4:
        proj, core = _v4_attention(c, layer, seq_len, dense)
        n = c.hc_mult
        # two HyperConnections: mixing map ((2 + n) n x n h) and the stream mix comb^T (n x n) x streams (n x h)
        hyper = 2 * (2 * (2 + n) * n * n * h + 2 * n * n * h)
    else:
        proj, core = _mla(c, seq_len, dense)
        hyper = 0.0
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
    hyper_head = 2 * c.hc_mult * c.hc_mult * h if c.is_v4 else 0.0
    mtp_flops = 0.0
    if mtp:
        for k in range(c.num_nextn_predict_layers):
            block = _layer(c, c.num_hidden_layers + k, seq_len, dense).total
            # V3: eh_proj [2h -> h]; V4: e_proj on the embedding, h_proj on each of the hc_mult streams, hyper head
            joins = 2 * 2 * h * h if not c.is_v4 else 2 * h * h * (1 + c.hc_mult) + hyper_head
            mtp_flops += joins + block + head
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
