"""Generation speed of the KV caches.

- DeepSeek-V3: with and without MLA's absorbed decode path (the KV cache holds latents; a decode step either
  re-expands every cached latent into per-head keys / values, or attends in latent space). Model: V3's attention
  shapes scaled down (8 heads, kv_lora_rank 512 as in V3, nope 128, rope 64, v 128).
- DeepSeek-V4: with its cache (window ring, compressor states, indexer entries) against recomputing the whole
  sequence for every token. Model: V4's attention scaled down (8 heads of 128, window 128, CSA ratio 4 with a
  4 x 64 indexer keeping the top 64, HCA ratio 128), 8 experts, top 2.
Batch 8, a 256-token prompt, 64 new tokens, greedy. Prints decode tokens/s per mode and the largest logit
difference between them.

Usage: python benchmarks/decode_speed.py [--out benchmarks/results/decode_speed.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from provenance import write_results  # benchmarks/provenance.py

from polytrain.models import build_model, preset
from polytrain.models.deepseek_v3.attention import MLA
from polytrain.rollout.generate import SamplingConfig, _sample_without_cache, alone

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, first_k_dense_replace=4, intermediate_size=1024,
             num_attention_heads=8, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
             v_head_dim=128, num_nextn_predict_layers=0, max_position_embeddings=4096)
V4_MODEL = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, head_dim=128,
                qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128, sliding_window=128,
                compress_ratios=[4, 128, 4, 128], index_n_heads=4, index_head_dim=64, index_topk=64,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, intermediate_size=256,
                num_nextn_predict_layers=0, max_position_embeddings=4096, yarn_original_max_position_embeddings=4096)


def decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, logits of every decode step)."""
    batch = prompt.shape[0]
    cache = model.new_cache(batch, prompt.shape[1] + new_tokens)
    start = time.perf_counter()
    logits = model(prompt, cache=cache)[:, -1]
    prefill = time.perf_counter() - start
    outputs = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)
        logits = model(token, cache=cache)[:, -1]
        outputs.append(logits)
    return prefill, time.perf_counter() - start, torch.stack(outputs, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(preset("tiny", **MODEL), "cpu", seed=0).eval()
    prompt = torch.randint(0, MODEL["vocab_size"], (args.batch, args.prompt))
    results, logits = {}, {}
    with torch.no_grad():
        decode(model, prompt[:, :32], 4)  # warm-up
        for mode, absorb in (("expanded", False), ("absorbed", True)):
            MLA.absorb_for_decode = absorb
            prefill, seconds, logits[mode] = decode(model, prompt, args.new_tokens)
            results[mode] = {"prefill_s": prefill, "decode_s": seconds,
                             "decode_tokens_per_s": args.batch * args.new_tokens / seconds}
    MLA.absorb_for_decode = True
    summary = {"threads": torch.get_num_threads(), "model": MODEL,
               "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "results": results,
               "speedup": results["absorbed"]["decode_tokens_per_s"] / results["expanded"]["decode_tokens_per_s"],
               "max_logit_diff": (logits["absorbed"] - logits["expanded"]).abs().max().item()}
    for mode, row in results.items():
        print(f"V3 {mode:9} decode {row['decode_tokens_per_s']:8.1f} tokens/s  (prefill {row['prefill_s']:.2f} s)")
    print(f"V3 absorbed / expanded: x{summary['speedup']:.2f}; max logit difference {summary['max_logit_diff']:.2e}")
    summary["deepseek_v4"] = v4_decode(args.batch, args.prompt, args.new_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, summary)


def v4_decode(batch: int, prompt_len: int, new_tokens: int) -> dict:
    """DeepSeek-V4 greedy decoding with the KV cache against the sampler that recomputes every sequence."""
    model = build_model(preset("tiny-v4", **V4_MODEL), "cpu", seed=0).eval()
    prompt = torch.randint(0, V4_MODEL["vocab_size"], (batch, prompt_len))
    with torch.no_grad():
        decode(model, prompt[:, :32], 4)  # warm-up
        prefill, seconds, cached = decode(model, prompt, new_tokens)
        start = time.perf_counter()
        tokens, _ = _sample_without_cache(model, prompt.tolist(), SamplingConfig(max_new_tokens=new_tokens), set(),
                                          0, alone, None)
        recompute = time.perf_counter() - start
        generated = torch.tensor(tokens)  # the cached run fed the same tokens when its greedy choices agree
        same = torch.equal(generated[:, 1:], cached[:, :-1].argmax(dim=-1))
        full = model(torch.cat([prompt, generated], dim=1))[:, prompt_len:]
    result = {"model": V4_MODEL, "cached": {"prefill_s": prefill, "decode_s": seconds,
                                            "decode_tokens_per_s": batch * new_tokens / seconds},
              "recompute": {"decode_s": recompute, "decode_tokens_per_s": batch * new_tokens / recompute},
              "same_tokens": same, "max_logit_diff": (cached - full).abs().max().item()}
    result["speedup"] = result["cached"]["decode_tokens_per_s"] / result["recompute"]["decode_tokens_per_s"]
    print(f"V4 cached    decode {result['cached']['decode_tokens_per_s']:8.1f} tokens/s  (prefill {prefill:.2f} s)")
    print(f"V4 recompute decode {result['recompute']['decode_tokens_per_s']:8.1f} tokens/s")
    print(f"V4 cached / recompute: x{result['speedup']:.2f}; max logit difference {result['max_logit_diff']:.2e}; "
          f"same tokens: {same}")
    return result


if __name__ == "__main__":
    main()
