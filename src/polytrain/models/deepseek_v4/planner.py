"""`polytrain plan`'s model of DeepSeek-V4 layers: FLOPs and kept activations of hybrid attention (sliding window,
CSA with its lightning indexer, HCA) and of the hyper-connections around every sub-layer."""

from __future__ import annotations

from collections.abc import Callable

from polytrain.models.deepseek_v4.blockwise import GATHER_ABOVE, QUERY_BLOCK
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


def window_keys_computed(seq_len: int, window: int, block: int = QUERY_BLOCK) -> float:
    """Mean window keys a query is multiplied with by the block attention: block b's queries [s, e) all take the
    keys [s - window + 1, e) (blockwise.py), the masked ones included."""
    total = 0
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        total += (end - start) * (end - max(0, start - window + 1))
    return total / seq_len


def compressed_entries_computed(c: DeepSeekV4Config, layer: int, seq_len: int) -> int:
    """Compressed entries a query is multiplied with by the block attention: all S // ratio for HCA, and for CSA
    its top-k, or all entries while there are at most GATHER_ABOVE x k (blockwise.py)."""
    ratio = c.compress_ratio(layer)
    if not ratio:
        return 0
    entries = seq_len // ratio
    gathered = ratio == c.compress_ratio_csa and entries > GATHER_ABOVE * min(c.index_topk, entries)
    return c.index_topk if gathered else entries


class V4Planner:
    fused_attention = True  # block by block (blockwise.py): no seq x seq scores kept for backward
    executes_model_flops = False  # its blocks multiply masked window keys and every HCA entry too

    def attention_flops(self, c: DeepSeekV4Config, layer: int, seq_len: int, dense: bool) -> tuple[float, float]:
        """Forward FLOPs per token of hybrid attention (models/deepseek_v4/attention.py): (projections, core).
        Counted as the architecture defines it: the sliding window (min(i, window) keys), the compressed entries a
        query may see (HCA: all of its past windows; CSA: its top-k of them) and the lightning indexer's scores over
        the visible compressed entries; `dense` counts what the block attention multiplies, masked products
        included (`window_keys_computed`, `compressed_entries_computed`; the indexer scores every entry)."""
        h, heads, d = c.hidden_size, c.num_attention_heads, c.head_dim
        proj = (h * c.q_lora_rank + c.q_lora_rank * heads * d + h * d  # q_a, q_b, shared kv
                + heads * d * c.o_lora_rank + c.o_groups * c.o_lora_rank * h)  # grouped o_a, o_b
        ratio = c.compress_ratio(layer)
        csa = ratio == c.compress_ratio_csa
        if dense:
            keys = window_keys_computed(seq_len, c.sliding_window) + compressed_entries_computed(c, layer, seq_len)
        else:
            keys = mean_min(seq_len, c.sliding_window)
            if ratio:
                keys += mean_entries(seq_len, ratio, c.index_topk if csa else None)
        core = 2 * heads * d * 2 * keys  # scores q.k and context p.v (values are the keys)
        pooled = (seq_len // ratio * ratio / seq_len if dense else 1.0) if ratio else 0.0  # tokens of whole windows
        if ratio:
            proj += pooled * 2 * h * d * (2 if csa else 1)  # compressor kv_proj + gate_proj (two series if overlapping)
        if csa:
            n_idx, d_idx = c.index_n_heads, c.index_head_dim
            proj += pooled * 2 * h * 2 * d_idx + c.q_lora_rank * n_idx * d_idx + h * n_idx  # compressor, q_b, weights
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
                                   tp: int, norm: Callable[[float], float], cp: int = 1) -> float:
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
        # the block attention keeps only its inputs (q, the keys, the entries); undoing the output's rotation keeps
        # its RoPE channels in fp32 (and their rotated half)
        attn += 2 * 4 * heads * c.qk_rope_head_dim
        attn += b * heads * d + b * c.o_groups * c.o_lora_rank  # grouped o_a input, o_b input
        if ratio:
            csa = ratio == c.compress_ratio_csa

            def compressor(width: float) -> float:  # kv / gate projections, pooled windows, softmax weights
                return (b * 2 + 4 + (2 * b + 4 if csa else 0)) * width

            # under context parallelism the compressors pool the whole row's gathered series (context.py)
            attn += cp * compressor(d * (2 if csa else 1))
            if csa:
                attn += 8 * c.index_topk  # the indexer runs without autograd: only its choice is kept
        return hyper + attn + (cp - 1) * b * d  # the block attention keeps the whole row's gathered keys

    def attention_backward_bytes(self, c: DeepSeekV4Config, layer: int, seq_len: int, b: int, fused: bool,
                                 tp: int, cp: int = 1) -> float:
        """One query block recomputed in backward (per token of the sequence): its logits and probabilities with
        their gradients, [H, block, window keys + entries + sink], and for CSA the gathered entries and their
        gradient [block, k, head_dim]. Under context parallelism the entries are the whole row's, and the
        gradient of the whole row's keys is held."""
        row = seq_len * cp
        block = min(QUERY_BLOCK, seq_len if cp == 1 else seq_len // 2)  # under CP each chunk is its own call
        entries = compressed_entries_computed(c, layer, row)
        keys = min(row, block + c.sliding_window - 1) + entries + 1
        scores = c.num_attention_heads / tp * block * keys * (5 * b + 8)
        gathered = 0
        if c.compress_ratio(layer) == c.compress_ratio_csa and entries < row // c.compress_ratio(layer):
            gathered = 2 * b * block * c.index_topk * c.head_dim
        # under CP the gradient of the whole row's gathered keys accumulates over the blocks
        return (scores + gathered) / seq_len + (cp * b * c.head_dim if cp > 1 else 0)

    def residual_width(self, c: DeepSeekV4Config) -> int:
        return c.hc_mult * c.hidden_size

    def kv_width(self, c: DeepSeekV4Config) -> int:
        return c.head_dim  # one shared key/value head (compressed entries not counted)

    def context_gather_width(self, c: DeepSeekV4Config, layer: int) -> tuple[int, int]:
        """The shared key / value, the compressor's key / value and gate series (twice as wide for CSA's
        overlapping windows) and CSA's indexer series, which have no gradient (models/deepseek_v4/context.py)."""
        ratio = c.compress_ratio(layer)
        if not ratio:
            return c.head_dim, c.head_dim
        if ratio != c.compress_ratio_csa:
            return 3 * c.head_dim, 3 * c.head_dim
        return 5 * c.head_dim + 4 * c.index_head_dim, 5 * c.head_dim
