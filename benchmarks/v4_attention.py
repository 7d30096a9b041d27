"""DeepSeek-V4 hybrid attention, one layer forward + backward: the block attention polytrain trains with against
the dense definition (models/deepseek_v4/attention_reference.py), time and peak memory by sequence length.

The layer is the V4 attention at reduced width (8 heads of 128, shared key / value head 128, window 128, CSA
ratio 4 with a 4 x 64 lightning indexer keeping the top 512, HCA ratio 128), batch 1, fp32 on the CPU. Peak memory
is the peak of live tensor bytes during the step (inputs and weights excluded), counted by a dispatch mode, so it
does not depend on the allocator. The dense reference runs where its [B, H, S, S + T] scores fit the machine;
elsewhere the table gives what its scores alone would need.

Usage (writes benchmarks/results/v4_attention.json, prints a Markdown table; about 5 minutes):
    python benchmarks/v4_attention.py [--seq 4096 16384 65536]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_results

from polytrain.models import model_config_from_table
from polytrain.models.common.rope import RotaryEmbedding
from polytrain.models.deepseek_v4.attention import HybridAttention
from polytrain.models.deepseek_v4.attention_reference import dense_hybrid_attention

LAYER = dict(preset="tiny-v4", hidden_size=1024, num_attention_heads=8, head_dim=128, qk_rope_head_dim=64,
             q_lora_rank=512, o_groups=4, o_lora_rank=256, sliding_window=128, compress_ratios=[4, 128, 0, 0],
             compress_ratio_csa=4, index_n_heads=4, index_head_dim=64, index_topk=512,
             max_position_embeddings=131072, yarn_original_max_position_embeddings=65536)
DENSE_LIMIT = 4 * 2**30  # bytes of one [B, H, S, S + T] fp32 score tensor the dense reference may allocate


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is active and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def step(attn: HybridAttention, ropes: dict, seq: int, dense: bool) -> tuple[float, int]:
    """(seconds, peak live bytes) of one forward + backward at `seq` tokens."""
    x = torch.randn(1, seq, attn.q_a_proj.in_features, requires_grad=True)
    position_ids = torch.arange(seq).unsqueeze(0)
    tables = {name: rope(position_ids) for name, rope in ropes.items()}
    attn.zero_grad(set_to_none=True)
    start = time.perf_counter()
    with LiveBytes() as live:
        out = dense_hybrid_attention(attn, x, ropes, tables, position_ids) if dense else attn(
            x, ropes, tables, position_ids)
        out.sum().backward()
    return time.perf_counter() - start, live.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (the median is kept)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "v4_attention.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = model_config_from_table(LAYER)
    ropes = {"main": RotaryEmbedding(config, theta=config.rope_theta, scaled=False),
             "compress": RotaryEmbedding(config, theta=config.compress_rope_theta, scaled=True)}
    rows = []
    print("| layer | tokens | block: s | block: peak MiB | dense: s | dense: peak MiB |")
    print("|---|---|---|---|---|---|")
    for layer, kind in ((0, "CSA (ratio 4, top-512)"), (1, "HCA (ratio 128)")):
        attn = HybridAttention(config, layer)
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.02)
        for seq in args.seq:
            row = {"layer": kind, "tokens": seq}
            for name, dense in (("block", False), ("dense", True)):
                scores = 4 * config.num_attention_heads * seq * (seq + seq // attn.ratio)
                if dense and scores > DENSE_LIMIT:
                    row[name] = {"skipped": f"its scores alone need {scores / 2**30:.0f} GiB"}
                    continue
                runs = [step(attn, ropes, seq, dense) for _ in range(args.repeats)]
                row[name] = {"seconds": round(statistics.median(r[0] for r in runs), 3),
                             "peak_mib": round(max(r[1] for r in runs) / 2**20, 1)}
            rows.append(row)
            cells = [f"{row[n]['seconds']:.2f} | {row[n]['peak_mib']:,.0f}" if "seconds" in row[n]
                     else f"- | ({row[n]['skipped']})" for n in ("block", "dense")]
            print(f"| {kind} | {seq:,} | " + " | ".join(cells) + " |", flush=True)
    write_results(args.out, {"benchmark": "v4_attention", "layer": LAYER, "rows": rows})


if __name__ == "__main__":
    main()
