"""polytrain vs Hugging Face transformers: one DeepSeek-V3-architecture model, same weights, data, batch, optimizer
and precision, trained by each in turn; tokens/s and peak memory side by side.

Both sides start from the same weights: polytrain initialises the model, exports it with its Hugging Face writer,
and each side loads that checkpoint (polytrain through `load_hf_weights`, transformers through `from_pretrained`),
so their step-0 losses must agree (checked). Every run is a fresh subprocess (clean peak-memory figure); the
settings alternate (A B C A B C ...) so a slow phase of the machine hits all of them alike.

transformers runs in a plain PyTorch loop (`model(input_ids, labels=...)`, backward, AdamW step) under each of its
MoE experts implementations (`grouped_mm`, `batched_mm`, `eager`) with SDPA attention; polytrain runs its own
training step (`polytrain.algorithms.sft.sft_loss`, the function its trainer calls) with the same AdamW settings.
The first transformers setting also runs once more with the host-memory setting polytrain's CPU backend makes
(reported beside the others, never counted as the peer's fastest: it is not a transformers setting). Each run
measures the matmul peak before and after its steps; its MFU is taken against the higher.

Usage: python benchmarks/vs_transformers.py [--steps 4] [--repeats 2] [--precision fp32|bf16] [--quick]
       [--width 512|768] [--peers grouped_mm,batched_mm,eager] [--no-peer-kept-memory] [--prompt-share 0.5] [--profile]
       [--out benchmarks/results/vs_transformers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py

ROOT = Path(__file__).resolve().parents[1]
# A DeepSeek-V3-architecture model of 232M parameters: MLA, 1 dense + 7 MoE layers, 32 routed experts (top-4 of 4
# groups, 2 groups per token) + 1 shared, the real DeepSeek vocabulary size (the output head is two thirds of the
# FLOPs, which is where a fused loss matters).
MODEL = dict(vocab_size=129280, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
             num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
             num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, num_nextn_predict_layers=0,
             aux_loss_alpha=0.0, max_position_embeddings=4096)
QUICK = dict(MODEL, vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=3, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4)
# `--width 768`: the same layers 1.5x wider (423M parameters; the head is 60% of the FLOPs instead of 67%)
WIDE = dict(MODEL, hidden_size=768, intermediate_size=2304, moe_intermediate_size=384, num_attention_heads=12,
            q_lora_rank=384, kv_lora_rank=192)
WIDTHS = {512: MODEL, 768: WIDE}  # --width
LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.95), 1e-8, 0.0
PEER_EXPERTS = ("grouped_mm", "batched_mm", "eager")  # transformers' MoE experts implementations


def model_dims(args: argparse.Namespace) -> dict:
    """The benchmark model's config overrides for these arguments."""
    return QUICK if args.quick else WIDTHS[args.width]


def polytrain_optimizer(model):
    """The AdamW polytrain's trainer builds for `model`, with the settings both sides of the benchmark use."""
    from polytrain.config import TrainConfig
    from polytrain.train.optim import build_optimizer

    train = TrainConfig(lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY)
    return build_optimizer(model, train)  # fused AdamW where torch has it


def batches(vocab: int, rows: int, seq: int, count: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, seq), generator=generator) for _ in range(count)]


def peak_rss() -> int:
    from polytrain.backends.base import host_memory

    return host_memory()[1]


def run_polytrain(args: argparse.Namespace, hf_dir: str, compiled: bool = False):
    prompt = int(args.prompt_share * args.seq)
    import torch

    from polytrain.algorithms.sft import StepTokens, sft_loss
    from polytrain.backends import get_backend
    from polytrain.data.dataset import IGNORE
    from polytrain.data.packing import Batch
    from polytrain.models import build_model
    from polytrain.models.common.decoder import shift_left
    from polytrain.models.hf import HFCheckpoint, load_hf_weights

    get_backend("cpu").prepare_training()  # what the trainer does first (host memory kept for reuse)
    checkpoint = HFCheckpoint(hf_dir)
    model = build_model(checkpoint.model_config, "cpu", seed=None)
    load_hf_weights(model, checkpoint)
    if compiled:
        from polytrain.parallel.compile import apply_compile

        apply_compile(model)  # what parallel.compile = true does; compiles during the warm-up step
    model.train()
    optimizer = polytrain_optimizer(model)

    def step(tokens: torch.Tensor) -> float:
        rows, seq = tokens.shape
        labels = shift_left(tokens, 1, IGNORE)
        labels[:, : max(prompt - 1, 0)] = IGNORE  # position i predicts token i + 1: no loss inside the prompt
        batch = Batch(tokens, labels, torch.arange(seq).expand(rows, seq), torch.zeros_like(tokens), rows)
        loss, _ = sft_loss(model, batch, StepTokens(batch.num_loss_tokens, []))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_transformers(args: argparse.Namespace, hf_dir: str, setting: dict):
    prompt = int(args.prompt_share * args.seq)
    import torch
    from transformers import AutoModelForCausalLM

    if setting.get("keep_host_memory"):  # polytrain's CPU allocator setting, applied to the peer's process
        from polytrain.backends.cpu import keep_freed_host_memory

        keep_freed_host_memory()

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=setting["attention"],
                                                 experts_implementation=setting["experts"])
    model.train()
    # the fused AdamW kernel too (torch's default on CPU is the per-parameter loop, several times slower)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  fused=True)

    def step(tokens: torch.Tensor) -> float:
        labels = tokens.clone()
        labels[:, :prompt] = -100  # transformers shifts the labels itself
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm")


def time_by_kind(profiler, vocab: int) -> dict[str, float]:
    """Self CPU seconds of a profiled step by kind: output-head GEMMs (an operand has the vocabulary dimension),
    other GEMMs (grouped experts included), attention kernels, optimizer, everything else (elementwise, copies,
    indexing, reductions)."""
    kinds: dict[str, float] = {}
    for event in profiler.key_averages(group_by_input_shape=True):
        name = event.key
        if name in GEMMS:
            kind = "gemm_output_head" if f"{vocab}" in str(event.input_shapes) else "gemm_other"
        elif "scaled_dot_product" in name or "attention" in name:
            kind = "attention"
        elif "adam" in name.lower() or name.startswith("Optimizer."):
            kind = "optimizer"
        else:
            kind = "elementwise_copies_other"
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    return kinds


def worker(args: argparse.Namespace) -> None:
    """One run in this process: build, warm up, time `--steps` steps; print one JSON line."""
    import contextlib

    import torch

    from polytrain.backends import get_backend
    from polytrain.bench.measure import matmul_peak

    torch.set_num_threads(args.threads)
    if args.memory_limit_gib:  # an allocation past it fails in this process instead of waking the OOM killer
        limit = int(args.memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    setting = json.loads(args.worker)
    baseline = peak_rss()
    if setting["framework"] == "polytrain":
        step = run_polytrain(args, args.hf_dir, setting.get("compile", False))
    else:
        step = run_transformers(args, args.hf_dir, setting)
    config = model_dims(args)
    data = batches(config["vocab_size"], args.rows, args.seq, args.warmup + args.steps)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    losses, times = [], []
    profile = None
    # the matmul peak before and after this run's steps: MFU against the machine as fast as it was during the run
    # (a shared 2-core VM can run at half speed for minutes)
    peak_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peaks = [matmul_peak(get_backend("cpu"), peak_dtype)]
    for index, tokens in enumerate(data):
        last = index == len(data) - 1
        profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
                    if args.profile and last else contextlib.nullcontext())
        start = time.perf_counter()
        with profiler, autocast:
            losses.append(step(tokens))
        elapsed = time.perf_counter() - start
        if index >= args.warmup and not (args.profile and last):
            times.append(elapsed)
        if args.profile and last:
            profile = {"top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                                   for e in sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]],
                       "by_kind_s": time_by_kind(profiler, config["vocab_size"])}
    peaks.append(matmul_peak(get_backend("cpu"), peak_dtype))
    print(json.dumps({"losses": losses, "times": times, "peak_rss": peak_rss(), "baseline_rss": baseline,
                      "matmul_peaks": peaks, "profile": profile}))


def launch(args: argparse.Namespace, setting: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(setting), "--hf-dir", args.hf_dir,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rows", str(args.rows),
               "--seq", str(args.seq), "--threads", str(args.threads), "--precision", args.precision,
               "--memory-limit-gib", str(args.memory_limit_gib), "--prompt-share", str(args.prompt_share)]
    command += ["--quick"] if args.quick else ["--width", str(args.width)]
    command += ["--profile"] if (args.profile and setting["framework"] == "polytrain") or args.profile_all else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src"),
           "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if result.returncode != 0:
        memory = result.returncode in (-9, 137) or "memory" in result.stderr[-2000:].lower()
        reason = (f"out of memory (address-space limit {args.memory_limit_gib} GiB)" if memory
                  else f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
        return {"failed": reason, "peak_rss": 0}
    return json.loads(result.stdout.strip().splitlines()[-1])


def name_of(setting: dict) -> str:
    if setting["framework"] == "polytrain":
        return "polytrain (parallel.compile)" if setting.get("compile") else "polytrain"
    kept = ", host memory kept" if setting.get("keep_host_memory") else ""
    return f"transformers ({setting['experts']} experts, {setting['attention']}{kept})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (alternating)")
    parser.add_argument("--rows", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--prompt-share", type=float, default=0.0,
                        help="leading share of each sequence that is prompt (no loss), as in SFT on chat data")
    parser.add_argument("--memory-limit-gib", type=float, default=18.0,
                        help="address-space limit of each run (a run that needs more fails cleanly)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32, or bf16 autocast over fp32 weights (both sides)")
    parser.add_argument("--peers", default=",".join(PEER_EXPERTS),
                        help="transformers experts implementations to run, comma-separated")
    parser.add_argument("--no-peer-kept-memory", action="store_true",
                        help="skip the extra run of transformers' first setting with polytrain's CPU host-memory "
                        "setting (glibc keeps freed memory: polytrain.backends.cpu.keep_freed_host_memory)")
    parser.add_argument("--compile", action="store_true", help="also run polytrain with parallel.compile (regional "
                        "torch.compile; the compile happens in the warm-up step)")
    parser.add_argument("--width", type=int, choices=sorted(WIDTHS), default=512,
                        help="hidden size of the benchmark model: 512 (232M parameters) or 768 (423M)")
    parser.add_argument("--quick", action="store_true", help="a small model (a smoke test of this script)")
    parser.add_argument("--profile", action="store_true", help="profile polytrain's last step (top ops by time)")
    parser.add_argument("--profile-all", action="store_true", help="profile every setting's last step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_transformers.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from polytrain.models import build_model, preset
    from polytrain.models.hf import save_hf
    from polytrain.plan.flops import flops_per_token

    config = preset("tiny", **model_dims(args))
    peers = [name for name in args.peers.split(",") if name]
    unknown = sorted(set(peers) - set(PEER_EXPERTS))
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(unknown)} (choose from {', '.join(PEER_EXPERTS)})")
    settings = [{"framework": "polytrain"}, *([{"framework": "polytrain", "compile": True}] if args.compile else []),
                *({"framework": "transformers", "experts": e, "attention": "sdpa"} for e in peers),
                *([] if args.no_peer_kept_memory or not peers else
                  [{"framework": "transformers", "experts": peers[0], "attention": "sdpa", "keep_host_memory": True}])]
    runs: dict[str, list[dict]] = {name_of(s): [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(config, "cpu", seed=0)
        params = sum(p.numel() for p in model.parameters())
        args.hf_dir = str(save_hf(model, Path(tmp) / "hf", dtype=torch.float32))
        del model
        for repeat in range(args.repeats):
            for setting in settings:
                result = launch(args, setting)
                runs[name_of(setting)].append(result)
                if "failed" in result:
                    print(f"[{repeat + 1}/{args.repeats}] {name_of(setting)}: {result['failed']}", file=sys.stderr)
                    continue
                median = statistics.median(result["times"])
                print(f"[{repeat + 1}/{args.repeats}] {name_of(setting)}: step {median:.3f} s, "
                      f"loss[0] {result['losses'][0]:.6f}, peak RSS {result['peak_rss'] / 2**30:.2f} GiB",
                      file=sys.stderr)

    torch.set_num_threads(args.threads)
    flops = flops_per_token(config, args.seq)
    tokens = args.rows * args.seq
    trained = args.rows * (args.seq - max(int(args.prompt_share * args.seq) - 1, 0) - 1)
    # model FLOPs: the output head is needed only where there is a label (work done beyond that is not counted)
    per_token = flops.total - flops.vocab_head * (1 - trained / tokens)
    table, failed = {}, {}
    for name, results in runs.items():
        if any("failed" in r for r in results):
            failed[name] = next(r["failed"] for r in results if "failed" in r)
            continue
        step = statistics.median(t for r in results for t in r["times"])
        # each run against the higher of the two peaks measured around it; the median over runs
        mfu = statistics.median(tokens / statistics.median(r["times"]) * per_token / max(r["matmul_peaks"])
                                for r in results)
        table[name] = {"step_time_s": step, "tokens_per_s": tokens / step,
                       "model_flops_per_s": tokens / step * per_token, "mfu_vs_measured_matmul": mfu,
                       "matmul_peaks": [p for r in results for p in r["matmul_peaks"]],
                       "peak_rss_gib": max(r["peak_rss"] for r in results) / 2**30,
                       "loss_step0": results[0]["losses"][0], "losses": results[0]["losses"],
                       "profile": next((r["profile"] for r in results if r["profile"]), None)}
    ours = table["polytrain"]
    peak = statistics.median(p for row in table.values() for p in row["matmul_peaks"])
    # the target is against transformers' own settings; the kept-memory run is reported beside it
    peers = {k: v for k, v in table.items() if not k.startswith("polytrain") and "host memory kept" not in k}
    fastest = min(peers, key=lambda k: peers[k]["step_time_s"])
    versus = {k: {"speedup": table[fastest]["step_time_s"] / v["step_time_s"],
                  "memory_ratio": v["peak_rss_gib"] / table[fastest]["peak_rss_gib"]}
              for k, v in table.items() if k.startswith("polytrain")}
    kept = next((k for k in table if "host memory kept" in k), None)
    summary = {
        "threads": args.threads,
        "model": {"parameters": params, **model_dims(args)},
        "rows": args.rows, "seq": args.seq, "prompt_share": args.prompt_share, "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "measured_matmul_peak_flops": peak,
        "model_flops_per_token": per_token, "results": table, "peer_fastest": fastest,
        "speedup_vs_fastest_peer": table[fastest]["step_time_s"] / ours["step_time_s"],
        "memory_ratio_vs_fastest_peer": ours["peak_rss_gib"] / table[fastest]["peak_rss_gib"],
        "versus_fastest_peer": versus,
        "speedup_vs_peer_with_kept_memory": table[kept]["step_time_s"] / ours["step_time_s"] if kept else None,
        "step0_loss_abs_diff": max(abs(v["loss_step0"] - ours["loss_step0"]) for v in table.values()),
        "failed": failed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, summary)
    print(f"{'setting':52} {'tokens/s':>9} {'step s':>8} {'GFLOP/s':>8} {'of peak':>8} {'peak GiB':>9} {'loss[0]':>9}")
    for name, row in table.items():
        print(f"{name:52} {row['tokens_per_s']:9.1f} {row['step_time_s']:8.3f} {row['model_flops_per_s'] / 1e9:8.1f} "
              f"{100 * row['mfu_vs_measured_matmul']:7.1f}% {row['peak_rss_gib']:9.2f} {row['loss_step0']:9.5f}")
    for name, reason in failed.items():
        print(f"{name:52} {reason}")
    print(f"measured {args.precision} matmul peak {peak / 1e9:.1f} GFLOP/s (median over runs; each run's MFU is "
          f"taken against its own); model {per_token / 1e6:.1f} MFLOP/token; "
          f"{params / 1e6:.1f}M parameters")
    for name, ratios in versus.items():
        print(f"{name} vs the fastest transformers setting ({fastest}): x{ratios['speedup']:.2f} tokens/s, "
              f"x{ratios['memory_ratio']:.2f} peak memory")
    for name, row in table.items():
        if row["profile"]:
            kinds = row["profile"]["by_kind_s"]
            print(f"profile of {name}'s last step ({sum(kinds.values()):.2f} s of self CPU time): " + ", ".join(
                f"{kind} {seconds:.2f} s" for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1])))
    if kept:
        print(f"polytrain vs {kept}: x{summary['speedup_vs_peer_with_kept_memory']:.2f} tokens/s")
    print(f"largest step-0 loss difference between settings: {summary['step0_loss_abs_diff']:.2e}")
    tolerance = 1e-4 if args.precision == "fp32" else 2e-2  # bf16: each side rounds its own products
    if summary["step0_loss_abs_diff"] > tolerance:
        raise SystemExit(f"step-0 losses disagree by {summary['step0_loss_abs_diff']:.2e}: not the same model")


if __name__ == "__main__":
    main()
