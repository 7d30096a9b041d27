"""Context parallelism (`parallel.cp`): activation memory and peak memory per rank by sequence length, for cp = 1, 2
and 4 (gloo processes on the CPU).

The model is DeepSeek-V3's architecture at reduced width (`MODEL`: the `tiny-v3` preset, hidden 512, 4 MLA heads of
64 + 32 rotary / value 64, latent 128 + 32 rotary, a dense layer and an MoE layer of 8 routed experts, top-2, plus
a shared expert, sequence-wise balance loss on; no MTP module, to keep the CPU time down), fp32. One packed row of
`tokens` tokens (documents of 512-1,024 random tokens, every token trained, position ids restarting per document)
runs one SFT step as the trainer runs it: `Batch.context_local` takes each rank's two load-balanced chunks, then
`sft_loss` (forward_train + fused output-head cross-entropy + balance loss) and backward. cp = c runs c gloo
processes of one thread each (cp = 4: 4 processes on however many cores the machine has); every rank builds the
same seeded model. Gradients are not reduced over the cp ranks (no optimizer step): that is parameter-sized, the
same for every cp, and not what this measures.

Measured per rank, by a dispatch mode that follows tensor storages (allocator-independent; parameters, buffers,
their gradients, allocated before the step, and the input batch are excluded; views are counted once per storage):
- activations: bytes of the storages created during the forward + loss that are still alive when it ends, i.e.
  what autograd (and the activation checkpoint) keeps for backward, split by the module that created them:
  attention (MLA: projections, norms, the gathered latents, the attention), mlp (the dense SwiGLU and the MoE:
  router, routed and shared experts), mask (the boolean attention mask and the rotary tables, built once per
  forward), loss (the output head's fused cross-entropy, which computes its input gradient in forward), other
  (embedding, norms and residual stream between the modules);
- peak: the largest total of live storages during forward + backward (activations, gradients of activations and
  what backward recomputes or allocates transiently).
Storages a kernel allocates internally without going through the dispatcher (e.g. the flash-attention kernel's
scratch) are not seen. The table reports the largest rank. Step time (forward + backward, median of `--repeats`
steps run without the meter) is CPU-only, one thread per rank, and not a speed claim.

Baselines. `cp=1 plain` is the model as trained without context parallelism. `cp=1 CP path` runs the same single
process through the context-parallel code path (a `ContextSplit` of size 1: no communication, but the attention is
checkpointed as it is under CP), so the ratios cp=2 and cp=4 against it isolate the splitting of the row; the plain
run differs by what the checkpoint drops (SDPA turns the boolean mask into an additive float mask per layer, and
the per-head keys and values; see below).

What is expected to fall as 1/cp: everything computed per token from the rank's own tokens (queries, the MLP and
expert activations, norms, residuals, the output head's buffers) and the attention mask, which is [local, whole row]
(1/cp, but still quadratic in the row length). What is not: each MLA layer all-gathers the normalised latent and the
rotary key of the whole row (kv_lora_rank + qk_rope_head_dim = 160 values per token here, 576 for DeepSeek-V3) and
keeps them for the recomputation, so every rank holds (160 x 4 bytes) x tokens per layer whatever cp is; and the
recomputation in backward expands the whole row's per-head keys and values (4 heads x (96 + 64), padded to 96,
here) transiently, which shows in the peak, not in the activations.

DeepSeek-V4 (`--model v4`: `MODEL_V4`, the `tiny-v4` preset at hidden 512, 4 heads of 64 (16 rotary), a CSA
layer (ratio 4, the lightning indexer keeping 64 entries) and an HCA layer (ratio 16), a 128-token window, 4
hyper-connection streams, 8 routed experts, the first layer hash-routed, no MTP module): its attention gathers the
whole row's shared keys and compressor series (models/deepseek_v4/context.py: 64 + 4 x 64 values per token on the
CSA layer, 64 + 2 x 64 on the HCA layer, kept for backward, and the indexer's series without autograd) and the
`mask` part is the rotary tables and packed layout of the rank's and the whole rows; the rest is as for V3.

Usage (writes benchmarks/results/context_parallel.json, one entry per model, prints Markdown tables; about 10
minutes per model on 2 cores):
    python benchmarks/context_parallel.py [--model v3|v4] [--seq 2048 4096 8192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import stamp, write_results  # benchmarks/provenance.py
from ranks import run_ranks  # benchmarks/ranks.py

MODEL = dict(preset="tiny-v3", hidden_size=512, num_attention_heads=4, num_hidden_layers=2, q_lora_rank=256,
             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, intermediate_size=1024,
             moe_intermediate_size=256, num_nextn_predict_layers=0)
MODEL_V4 = dict(preset="tiny-v4", hidden_size=512, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16,
                q_lora_rank=256, o_groups=2, o_lora_rank=64, num_hidden_layers=2, compress_ratios=[4, 16],
                sliding_window=128, index_n_heads=4, index_head_dim=32, index_topk=64, moe_intermediate_size=256,
                intermediate_size=1024, num_nextn_predict_layers=0, max_position_embeddings=8192)
MODELS = {"v3": MODEL, "v4": MODEL_V4}
CP_DEGREES = (1, 2, 4)
TAGS = ("attention", "mlp", "mask", "loss", "other")


def activation_meter():
    """The dispatch mode class (imported lazily: the launcher process does not need torch)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class ActivationMeter(TorchDispatchMode):
        """Live bytes of the storages created while active, by the tag current when each was created (see
        `tagging`), excluding the storages of `existing` tensors. `forward_done()` snapshots what is alive."""

        def __init__(self, existing: list[torch.Tensor], tags: list[str]) -> None:
            super().__init__()
            self.known = {t.untyped_storage().data_ptr() for t in existing}
            self.tags = tags
            self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}
            self.current: dict[str, int] = {}
            self.peak, self.peak_by_tag = 0, {}
            self.forward_by_tag: dict[str, int] = {}

        def _expire(self) -> None:
            for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
                _, size, tag = self.live.pop(key)
                self.current[tag] -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self._expire()
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    if key in self.known or key in self.live:
                        continue
                    tag = self.tags[-1]
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes(), tag)
                    self.current[tag] = self.current.get(tag, 0) + storage.nbytes()
            total = sum(self.current.values())
            if total > self.peak:
                self.peak, self.peak_by_tag = total, {k: v for k, v in self.current.items() if v}
            return out

        def forward_done(self) -> None:
            gc.collect()
            self._expire()
            self.forward_by_tag = {k: v for k, v in self.current.items() if v}
            self.tags.append("backward")

    return ActivationMeter


@contextlib.contextmanager
def tagging(model, tags: list[str]):
    """While active, `tags[-1]` names what is running: the MLA modules (attention), the dense MLP and MoE modules
    (mlp), the model's mask and rotary tables (mask), the output head's loss (loss), else other."""
    from polytrain.models.common.layers import SwiGLU
    from polytrain.models.common.moe import MoE
    from polytrain.models.deepseek_v3.attention import MLA
    from polytrain.models.deepseek_v4.attention import HybridAttention

    def push(tag):
        return lambda *_: tags.append(tag)

    def pop(*_):
        tags.pop()

    handles = []
    for module in model.modules():
        tag = ("attention" if isinstance(module, (MLA, HybridAttention)) else "mlp" if isinstance(module, (SwiGLU, MoE))
               else None)
        if tag is not None:
            handles += [module.register_forward_pre_hook(push(tag)), module.register_forward_hook(pop)]

    def wrap(owner, name, tag):
        method = getattr(owner, name)

        def tagged(*args, **kwargs):
            tags.append(tag)
            try:
                return method(*args, **kwargs)
            finally:
                tags.pop()

        setattr(owner, name, tagged)

    wrap(model, "layer_inputs", "mask")
    wrap(model.lm_head, "loss_sum", "loss")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        del model.layer_inputs, model.lm_head.loss_sum


def packed_row(tokens: int, doc_len: tuple[int, int], vocab: int):
    """(samples, one packed row of exactly `tokens` tokens): documents of doc_len[0]..doc_len[1] random tokens (the
    last one takes the rest), the same on every rank."""
    import torch

    from polytrain.data.dataset import full_sample
    from polytrain.data.packing import collate

    generator = torch.Generator().manual_seed(tokens)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        length = int(torch.randint(doc_len[0], doc_len[1] + 1, (1,), generator=generator))
        lengths.append(min(length, tokens - sum(lengths)))
    samples = [full_sample(n, vocab, generator) for n in lengths]
    return samples, collate(samples, tokens, packing=True)


def worker(out: str, model_name: str, seqs: list[int], repeats: int, doc_len: tuple[int, int]) -> None:
    import torch
    import torch.distributed as dist

    from polytrain.algorithms.sft import StepTokens, sft_loss
    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.common.context_split import ContextSplit
    from polytrain.parallel.context import apply_context_parallel

    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=1))
    config = model_config_from_table(MODELS[model_name])
    model = build_model(config, "cpu", seed=0)
    for p in model.parameters():  # allocated up front: backward accumulates into them in place
        p.grad = torch.zeros_like(p)
    meter_class = activation_meter()
    variants = ([("cp=1 plain", None, repeats), ("cp=1 CP path", ContextSplit(1, 0), 0)] if world == 1
                else [(f"cp={world}", ContextSplit(world, rank), repeats)])
    tags = ["other"]

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    def step(batch, step_tokens, meter=None) -> tuple[float, float]:
        for p in model.parameters():
            p.grad.zero_()
        barrier()
        start = time.perf_counter()
        with meter if meter is not None else contextlib.nullcontext():
            loss, parts = sft_loss(model, batch, step_tokens)
            if meter is not None:
                meter.forward_done()
            loss.backward()
        seconds = time.perf_counter() - start
        del tags[1:]
        loss_sum = parts["loss_sum"].detach().clone()
        if world > 1:
            dist.all_reduce(loss_sum)
        return seconds, float(loss_sum)

    results = []
    with tagging(model, tags):
        for seq in seqs:
            samples, whole = packed_row(seq, doc_len, config.vocab_size)
            step_tokens = StepTokens.of(samples, 0)
            for name, split, timed in variants:
                if split is None:
                    for module in model.modules():
                        if hasattr(module, "context_split"):
                            module.context_split = None
                    batch = whole
                else:
                    apply_context_parallel(model, split)
                    batch = whole.context_local(split)
                existing = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers(),
                            batch.input_ids, batch.labels, batch.position_ids, batch.doc_ids]
                meter = meter_class(existing, tags)
                _, loss_sum = step(batch, step_tokens, meter)
                seconds = [step(batch, step_tokens)[0] for _ in range(timed)]
                results.append({"tokens": seq, "case": name, "local_tokens": batch.input_ids.shape[1],
                                "documents": len(samples), "loss_sum": loss_sum,
                                "activation_bytes": meter.forward_by_tag, "peak_bytes": meter.peak,
                                "peak_by_tag": meter.peak_by_tag, "seconds": [round(s, 3) for s in seconds]})
                print(f"rank {rank}: {name}, {seq} tokens: activations "
                      f"{sum(meter.forward_by_tag.values()) / 2**20:.0f} MiB, peak {meter.peak / 2**20:.0f} MiB, "
                      f"{seconds} s", file=sys.stderr, flush=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> list[list[dict]]:
    """Run the worker in `world` processes; each rank's results."""
    def command(folder: str) -> list[str]:
        return [sys.executable, __file__, "--worker", folder, "--model", args.model, "--seq", *map(str, args.seq),
                "--repeats", str(args.repeats), "--doc-len", *map(str, args.doc_len)]

    return run_ranks(world, command, args.timeout, f"cp={world}")


def merge(ranks: list[list[dict]], cp: int) -> list[dict]:
    """One row per (tokens, case): the largest rank's numbers, and every rank's."""
    rows = []
    for per_rank in zip(*ranks):
        first = per_rank[0]
        activations = [sum(r["activation_bytes"].values()) for r in per_rank]
        worst = per_rank[activations.index(max(activations))]
        times = [statistics.median(r["seconds"]) for r in per_rank if r["seconds"]]
        rows.append({"tokens": first["tokens"], "case": first["case"], "cp": cp, "local_tokens": first["local_tokens"],
                     "documents": first["documents"], "loss_sum": first["loss_sum"],
                     "activation_mib": round(max(activations) / 2**20, 1),
                     "activation_mib_by_part": {t: round(worst["activation_bytes"].get(t, 0) / 2**20, 1)
                                                for t in TAGS},
                     "peak_mib": round(max(r["peak_bytes"] for r in per_rank) / 2**20, 1),
                     "seconds": round(max(times), 2) if times else None,
                     "ranks": per_rank})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="v3",
                        help="the architecture (the other model's entry in --out is kept)")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192], help="tokens per row")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (the median is kept)")
    parser.add_argument("--doc-len", type=int, nargs=2, default=[512, 1024], help="document lengths (min max)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cp degree")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "context_parallel.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.seq, args.repeats, tuple(args.doc_len))
        return
    if any(seq % (2 * max(CP_DEGREES)) for seq in args.seq):
        parser.error(f"every --seq must split into 2 x cp = {2 * max(CP_DEGREES)} equal chunks")
    start = time.perf_counter()
    rows = [row for cp in CP_DEGREES for row in merge(launch(cp, args), cp)]
    wall = time.perf_counter() - start
    cases = list(dict.fromkeys(row["case"] for row in rows))
    table = {(row["tokens"], row["case"]): row for row in rows}
    for seq in args.seq:
        base = table[seq, "cp=1 CP path"]
        for case in cases:
            row = table[seq, case]
            row["activation_vs_cp1_cp_path"] = round(row["activation_mib"] / base["activation_mib"], 3)
            row["peak_vs_cp1_cp_path"] = round(row["peak_mib"] / base["peak_mib"], 3)
            row["loss_sum_vs_cp1_plain"] = row["loss_sum"] / table[seq, "cp=1 plain"]["loss_sum"] - 1

    print("Activations per rank, MiB (ratio to cp=1 CP path):\n")
    print("| tokens | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for seq in args.seq:
        cells = [f"{table[seq, c]['activation_mib']:,.0f} ({table[seq, c]['activation_vs_cp1_cp_path']:.2f})"
                 for c in cases]
        print(f"| {seq:,} | " + " | ".join(cells) + " |")
    print("\nPeak live bytes during forward + backward per rank, MiB (ratio to cp=1 CP path):\n")
    print("| tokens | " + " | ".join(cases) + " |")
    print("|---|" + "---|" * len(cases))
    for seq in args.seq:
        cells = [f"{table[seq, c]['peak_mib']:,.0f} ({table[seq, c]['peak_vs_cp1_cp_path']:.2f})" for c in cases]
        print(f"| {seq:,} | " + " | ".join(cells) + " |")
    print("\nActivations by part (largest rank), MiB; step time (CPU, 1 thread per rank, not a speed claim):\n")
    print("| tokens | case | local tokens | " + " | ".join(TAGS) + " | total | peak | step s |")
    print("|---|---|---|" + "---|" * len(TAGS) + "---|---|---|")
    for row in rows:
        parts = " | ".join(f"{row['activation_mib_by_part'][t]:,.1f}" for t in TAGS)
        seconds = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        print(f"| {row['tokens']:,} | {row['case']} | {row['local_tokens']:,} | {parts} | "
              f"{row['activation_mib']:,.1f} | {row['peak_mib']:,.1f} | {seconds} |")
    print(f"\n({wall:.0f} s)")
    config = {"model": MODELS[args.model], "doc_len": args.doc_len, "repeats": args.repeats, "dtype": "float32",
              "threads_per_rank": 1}
    method = __doc__.split("\n\n", 1)[1].split("\n\nUsage")[0]
    rows.sort(key=lambda r: (r["tokens"], r["cp"], r["case"]))
    models = {}
    if Path(args.out).exists():
        models = json.loads(Path(args.out).read_text()).get("models", {})
    models[args.model] = stamp({"config": config, "wall_seconds": round(wall), "rows": rows})  # each its own run
    write_results(args.out, {"benchmark": "context_parallel", "method": method, "models": models})


if __name__ == "__main__":
    main()
