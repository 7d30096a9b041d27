"""How fast this machine runs the GEMM shapes of the vs_transformers model, against its 2048^3 matmul peak.

The ceiling behind the "model FLOP/s >= half the matmul peak" target: a training step cannot run its FLOPs faster
than the GEMMs they are made of. Measured here, each in isolation (warm operands, best of repeats like the peak), fp32:
- the output head's three GEMMs per chunk (logits, hidden gradient, weight gradient: polytrain's fused loss, rows
  tokens per chunk, K or N = the 129,280-token vocabulary);
- the routed experts' grouped GEMM (~256 tokens per expert, as in the benchmark), forward and forward + backward;
- a dense [tokens x hidden] x [hidden x hidden] projection;
- and, not GEMMs but in the step too, the causal flash attention of one layer (forward + backward, at the model's
  query / key head size, values padded to it as polytrain's MLA does) and one fused AdamW step over the model's
  parameters, as polytrain's trainer builds it.
Then `ceiling_mfu`: the model's FLOPs over the time they would take at these rates and times, i.e. the MFU a step
with no overhead at all would reach, every part measured in the same few minutes of this machine.

Usage: python benchmarks/gemm_shapes.py [--repeats 5] [--width 512|768] [--attention-s S] [--optimizer-s S]
       [--out benchmarks/results/gemm_shapes.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from provenance import write_results  # benchmarks/provenance.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(fn, repeats: int) -> float:
    """Best time of `repeats` runs after one warm-up: the same statistic `matmul_peak` takes of the peak GEMM."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(repeats: int, model: dict) -> dict:
    """Rates and times for the benchmark model with config overrides `model` (a vs_transformers.WIDTHS entry)."""
    from polytrain.backends import get_backend
    from polytrain.bench.measure import matmul_peak
    from polytrain.models.common.output_head import chunk_rows

    torch.manual_seed(0)
    peaks = [matmul_peak(get_backend("cpu"), torch.float32)]  # and again at the end: the higher is the peak
    vocab, hidden, inter = model["vocab_size"], model["hidden_size"], model["moe_intermediate_size"]
    experts, top_k, tokens = model["n_routed_experts"], model["num_experts_per_tok"], 2048
    rates: dict[str, float] = {}

    rows = chunk_rows(vocab)
    weight, h = torch.randn(vocab, hidden) * 0.02, torch.randn(rows, hidden)
    logits, grad_h, grad_w = torch.empty(rows, vocab), torch.empty(rows, hidden), torch.zeros(vocab, hidden)
    flops = 2 * rows * hidden * vocab
    rates["head_logits"] = flops / timed(lambda: torch.mm(h, weight.t(), out=logits), repeats)
    rates["head_grad_hidden"] = flops / timed(lambda: torch.mm(logits, weight, out=grad_h), repeats)
    rates["head_grad_weight"] = flops / timed(lambda: grad_w.addmm_(logits.t(), h), repeats)

    slots = tokens * top_k
    counts = torch.full((experts,), slots // experts)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(slots, hidden, requires_grad=True)
    gate_up = torch.randn(experts, 2 * inter, hidden, requires_grad=True)
    flops = 2 * slots * hidden * 2 * inter
    rates["experts_forward"] = flops / timed(
        lambda: torch._grouped_mm(x, gate_up.transpose(-2, -1), offsets), repeats)
    grad = torch.randn(slots, 2 * inter)

    def forward_backward() -> None:
        out = torch._grouped_mm(x, gate_up.transpose(-2, -1), offsets)
        torch.autograd.grad(out, (x, gate_up), grad)

    rates["experts_forward_backward"] = 3 * flops / timed(forward_backward, repeats)
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, hidden)
    rates["dense_projection"] = 2 * tokens * hidden * hidden / timed(lambda: a @ b, repeats)
    seconds = {"attention": model["num_hidden_layers"] * timed(_attention_layer(tokens, model), repeats),
               "optimizer": timed(_optimizer_step(model), repeats)}
    peaks.append(matmul_peak(get_backend("cpu"), torch.float32))
    peak = max(peaks)
    return {"matmul_peak_flops": peak, "matmul_peaks": peaks, "rates_flops": rates,
            "of_peak": {name: rate / peak for name, rate in rates.items()}, "head_chunk_rows": rows,
            "seconds_per_step": seconds}


def _attention_layer(tokens: int, model: dict):
    """One layer's causal attention forward + backward as polytrain's MLA runs it on the CPU (flash kernel)."""
    import torch.nn.functional as F

    heads, qk = model["num_attention_heads"], model["qk_nope_head_dim"] + model["qk_rope_head_dim"]
    q, k, v = (torch.randn(1, heads, tokens, qk, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, heads, tokens, qk)

    def run() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=qk**-0.5)
        torch.autograd.grad(out, (q, k, v), grad)

    return run


def _optimizer_step(model: dict):
    """One fused AdamW step over the benchmark model's parameters, built as polytrain's trainer builds it."""
    from vs_transformers import polytrain_optimizer

    from polytrain.models import build_model, preset

    module = build_model(preset("tiny", **model), "cpu", seed=0)
    for param in module.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    return polytrain_optimizer(module).step


def ceiling(result: dict, attention_s: float, optimizer_s: float, model: dict) -> dict:
    """Seconds per 2,048-token step if every FLOP ran at its measured GEMM rate (attention and the optimizer taking
    the given times), and the MFU that would give. `model`: the benchmark model's config overrides."""
    from polytrain.models import preset
    from polytrain.plan.flops import flops_per_token

    config = preset("tiny", **model)  # how vs_transformers builds its model
    f, tokens, rates = flops_per_token(config, 2048), 2048, result["rates_flops"]
    head_rate = 3 / sum(1 / rates[k] for k in ("head_logits", "head_grad_hidden", "head_grad_weight"))
    seconds = {
        "output_head": f.vocab_head * tokens / head_rate,
        "experts": (f.moe_routed + f.moe_shared) * tokens / rates["experts_forward_backward"],
        "projections": (f.attention_projections + f.dense_mlp + f.router) * tokens / rates["dense_projection"],
        "attention": attention_s,
        "optimizer": optimizer_s,
    }
    step = sum(seconds.values())
    return {"seconds": seconds, "step_s": step, "model_flops": f.total * tokens,
            "ceiling_mfu": f.total * tokens / step / result["matmul_peak_flops"]}


def main() -> None:
    from vs_transformers import WIDTHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention-s", type=float,
                        help="attention forward + backward per step, instead of the time measured here (e.g. from "
                             "a --profile of vs_transformers)")
    parser.add_argument("--optimizer-s", type=float, help="the optimizer step, instead of the time measured here")
    parser.add_argument("--width", type=int, choices=sorted(WIDTHS), default=512,
                        help="the vs_transformers model of this hidden size (its --width)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gemm_shapes.json"))
    args = parser.parse_args()
    model = WIDTHS[args.width]
    result = measure(args.repeats, model)
    measured = result["seconds_per_step"]
    result["ceiling"] = ceiling(result, measured["attention"] if args.attention_s is None else args.attention_s,
                                measured["optimizer"] if args.optimizer_s is None else args.optimizer_s, model)
    result["hidden_size"] = model["hidden_size"]
    result["threads"] = torch.get_num_threads()
    print(f"matmul peak (2048^3 fp32, the higher of before / after): {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s")
    for name, rate in result["rates_flops"].items():
        print(f"{name:26} {rate / 1e9:7.0f} GFLOP/s  {result['of_peak'][name]:6.1%} of peak")
    for name, seconds in result["seconds_per_step"].items():
        print(f"{name:26} {seconds:7.2f} s per step (measured)")
    c = result["ceiling"]
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in c["seconds"].items())
    print(f"step at these rates: {c['step_s']:.2f} s ({parts}); ceiling MFU {c['ceiling_mfu']:.1%}")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
