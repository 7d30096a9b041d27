"""`polytrain plan`'s model of DeepSeek-V4 layers: FLOPs and kept activations of hybrid attention (sliding window,
CSA with its lightning indexer, HCA) and of the hyper-connections around every sub-layer."""

from __future__ import annotations

from collections.abc import Callable

from polytrain.models.deepseek_v4.config import DeepSeekV4Config


def mean_min(seq_len: int, cap: int) -> float:
    """Mean over positions t = 1..seq_len of min(t, cap): keys a causal query sees under a window `cap`."""
    if seq_len <= cap:
        return (seq_len + 1) / 2
    return (cap * (cap + 1) / 2 + (seq_len - cap) * cap) / seq_len


def mean_entries(seq_len: int, ratio: int, cap: int | None) -> float:
    """Mean over positions t = 1..seq_len of min(cap, t // ratio): compressed entries a query may see (a window
    of `ratio` tokens becomes visible once it lies wholly in the past)."""
    limit = seq_len if cap is None else min(seq_len, cap * ratio - 1)
    q, r = divmod(limit, ratio)
    below = ratio * q * (q - 1) / 2 + q * (r + 1)  # sum of t // ratio for t = 1..limit
    above = 0 if cap is None else max(0, seq_len - limit) * cap
    return (below + above) / seq_len


class V4Planner:
    fused_attention = False  # the dense reference attention materialises [B, H, S, S + T] scores

    def attention_flops(self, c: DeepSeekV4Config, layer: int, seq_len: int, dense: bool) -> tuple[float, float]:
        """Forward FLOPs per token of hybrid attention (models/deepseek_v4/attention.py): (projections, core).
        Counted as the architecture defines it: the sliding window (min(i, window) keys), the compressed entries a
        query may see (HCA: all of its past windows; CSA: its top-k of them) and the lightning indexer's scores over
        the visible compressed entries; `dense` counts every key as a masked full matrix product does."""
        h, heads, d = c.hidden_size, c.num_attention_heads, c.head_dim
        proj = (h * c.q_lora_rank + c.q_lora_rank * heads * d + h * d  # q_a, q_b, shared kv
                + heads * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * h)  # grouped o_a, o_b
        ratio = c.compress_ratio(layer)
        csa = ratio == c.compress_ratio_csa
        if dense:
            keys = seq_len + (seq_len // ratio if ratio else 0)
        else:
            keys = mean_min(seq_len, c.sliding_window)
            if ratio:
                keys += mean_entries(seq_len, ratio, c.index_topk if csa else None)
        core = 2 * heads * d * 2 * keys  # scores q.k and context p.v (values are the keys)
        if ratio:
            proj += 2 * h * d * (2 if csa else 1)  # compressor kv_proj + gate_proj (two series when overlapping)
        if csa:
            n_idx, d_idx = c.index_n_heads, c.index_head_dim
            proj += 2 * h * 2 * d_idx + c.q_lora_rank * n_idx * d_idx + h * n_idx  # its compressor, q_b, weights
            visible = seq_len // ratio if dense else mean_entries(seq_len, ratio, None)
            core += 2 * n_idx * d_idx * visible
        return 2 * proj, core

    def layer_extra_flops(self, c: DeepSeekV4Config) -> float:
        # two HyperConnections: mixing map ((2 + n) n x n h) and the stream mix comb^T (n x n) x streams (n x h)
        n, h = c.hc_mult, c.hidden_size
        return 2 * (2 * (2 + n) * n * n * h + 2 * n * n * h)

    def head_extra_flops(self, c: DeepSeekV4Config) -> float:
        return 2 * c.hc_mult * c.hc_mult * c.hidden_size  # the hyper head

    def mtp_join_flops(self, c: DeepSeekV4Config) -> float:
        # e_proj on the embedding, h_proj on each of the hc_mult streams, and the module's own hyper head
        h = c.hidden_size
        return 2 * h * h * (1 + c.hc_mult) + self.head_extra_flops(c)

    def attention_activation_bytes(self, c: DeepSeekV4Config, layer: int, seq_len: int, b: int, fused: bool,
                                   tp: int, norm: Callable[[float], float]) -> float:
        heads = c.num_attention_heads / tp
        h, n, d = c.hidden_size, c.hc_mult, c.head_dim
        ratio = c.compress_ratio(layer)
        # two hyper-connections, each: the streams (+ their fp32 copy when b < 4) and their normalised fp32 copy;
        # the Sinkhorn-Knopp iterations keep every intermediate n x n matrix and its sums; the merge keeps the
        # sub-layer output, post and comb
        sinkhorn = c.hc_sinkhorn_iters * 2 * 4 * (n * n + n)
        merge = b * h + 4 * (n * n + n)
        hyper = 2 * (b * n * h + (4 if b < 4 else 0) * n * h + 4 * n * h + 4 * (2 + n) * n + sinkhorn + merge)
        attn = norm(h) + norm(c.q_lora_rank) + norm(d)  # input, query latent and kv norms
        attn += 3 * b * heads * d  # q, its unweighted-norm output and the rotated q
        entries = seq_len // ratio if ratio else 0
        if fused:
            attn += b * heads * d + 4 * heads  # output, log-sum-exp
        else:  # logits (amax keeps them), probabilities, the visibility mask, output
            attn += 2 * b * heads * (seq_len + entries + 1) + (seq_len + entries) + b * heads * d
        attn += b * heads * d + b * c.o_groups * c.o_lora_rank  # grouped o_a input, o_b input
        if ratio:
            csa = ratio == c.compress_ratio_csa

            def compressor(width: float) -> float:  # kv / gate projections, pooled windows, softmax weights
                return (b * 2 + 4 + (2 * b + 4 if csa else 0)) * width

            attn += compressor(d * (2 if csa else 1))
            if csa:
                n_idx, d_idx = c.index_n_heads, c.index_head_dim
                attn += compressor(2 * d_idx) + 3 * b * n_idx * d_idx + 4 * n_idx  # its compressor, q, weights
                if not fused:  # the reference indexer keeps [S, H, T] scores: product, ReLU, scaled
                    attn += 3 * 4 * n_idx * entries
                attn += 8 * c.index_topk
        return hyper + attn

    def attention_backward_bytes(self, c: DeepSeekV4Config, layer: int, seq_len: int, b: int, fused: bool,
                                 tp: int) -> float:
        """The materialised scores' backward: the gradients of the probabilities and of the logits."""
        if fused:
            return 0.0
        ratio = c.compress_ratio(layer)
        entries = seq_len // ratio if ratio else 0
        return 2 * b * c.num_attention_heads / tp * (seq_len + entries + 1)

    def residual_width(self, c: DeepSeekV4Config) -> int:
        return c.hc_mult * c.hidden_size

    def kv_width(self, c: DeepSeekV4Config) -> int:
        return c.head_dim  # one shared key/value head (compressed entries not counted)
