"""`polytrain plan`'s model of DeepSeek-V3 layers: FLOPs and kept activations of multi-head latent attention."""

from __future__ import annotations

from collections.abc import Callable

from polytrain.models.deepseek_v3.config import DeepSeekV3Config


class V3Planner:
    fused_attention = True  # SDPA's flash kernel (values padded to the query head size)
    executes_model_flops = True  # a flash kernel skips the masked (future) tiles

    def attention_flops(self, c: DeepSeekV3Config, layer: int, seq_len: int, dense: bool) -> tuple[float, float]:
        """Forward FLOPs per token of MLA: (projections, scores + context); causal: seq_len / 2 keys per query."""
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

    def layer_extra_flops(self, c: DeepSeekV3Config) -> float:
        return 0.0

    def head_extra_flops(self, c: DeepSeekV3Config) -> float:
        return 0.0

    def mtp_join_flops(self, c: DeepSeekV3Config) -> float:
        return 2 * 2 * c.hidden_size * c.hidden_size  # eh_proj [2h -> h]

    def attention_activation_bytes(self, c: DeepSeekV3Config, layer: int, seq_len: int, b: int, fused: bool,
                                   tp: int, norm: Callable[[float], float], cp: int = 1) -> float:
        """MLA (models/deepseek_v3/attention.py): its norms, q / k / v (values zero-padded to the query head size so
        SDPA can use its fused kernel) and the output projection's input; without a fused kernel the softmax
        probabilities instead of the output and log-sum-exp. Under context parallelism the attention over the
        whole row is checkpointed: it keeps q and the whole row's gathered latent and rotary key instead."""
        heads = c.num_attention_heads / tp
        qk, dv = c.qk_head_dim, c.v_head_dim
        attn = norm(c.hidden_size) + norm(c.kv_lora_rank) + (norm(c.q_lora_rank) if c.q_lora_rank else 0)
        if cp > 1:
            attn += b * heads * qk + cp * b * self.kv_width(c)
        elif fused:
            attn += 4 * b * heads * qk + 4 * heads  # q, k, padded v, padded output, log-sum-exp
        else:
            attn += 3 * b * heads * qk + b * heads * seq_len  # scaled q, k, padded v; softmax probabilities
        return attn + b * heads * dv  # o_proj input

    def attention_backward_bytes(self, c: DeepSeekV3Config, layer: int, seq_len: int, b: int, fused: bool,
                                 tp: int, cp: int = 1) -> float:
        """Without a fused kernel, the softmax backward's gradients of the probabilities and of the scores. Under
        context parallelism, the recomputed expansion of the whole row (kv_b_proj's output, k, padded v), the
        gradients of k and v, and the additive mask [local, whole row] SDPA makes of the boolean one."""
        heads = c.num_attention_heads / tp
        scores = 0.0 if fused else 2 * b * heads * seq_len * cp
        if cp == 1:
            return scores
        expanded = heads * (c.qk_nope_head_dim + c.v_head_dim + 4 * c.qk_head_dim)
        return scores + cp * b * (expanded + seq_len)

    def context_gather_width(self, c: DeepSeekV3Config, layer: int) -> tuple[int, int]:
        return self.kv_width(c), self.kv_width(c)

    def residual_width(self, c: DeepSeekV3Config) -> int:
        return c.hidden_size

    def kv_width(self, c: DeepSeekV3Config) -> int:
        return c.kv_lora_rank + c.qk_rope_head_dim  # MLA caches the latent and the rotary key
