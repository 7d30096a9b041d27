"""The planner's per-device memory against the dry run's, category by category, at real size.

For each job (a model, a layout on 1,024 or 256 ranks of a 910C cluster) the planner's prediction for a pipeline
stage (plan/memory.py) is set beside `polytrain dryrun`'s measurement of the rank running that stage (one SFT step
through the engine, on tensors without storage). The categories are matched as follows:

- weights and optimizer: the planner's parameters + optimizer state (bf16 copies, fp32 master weights, moments),
  and with everything offloaded its host memory (the sharded state); the dry run's parameters (this rank's fp32
  shards) + optimizer state (moments), and with everything offloaded as many bytes of gradients (the sharded
  gradients in host memory);
- gradients: both count the sharded gradients and, between micro-batches, the unsharded ones FSDP accumulates;
- working set: the planner's activations + transient (gathered layers, recomputation, logits, buffers); the dry
  run's activations + temporaries + communication buffers;
- peak: the planner's device peak; the dry run's peak of all live tensors (no allocator slack), with everything
  offloaded its peak without the host-resident state (`device_peak_bytes`).

The dry run reports the categories at the moment its total peaks; with everything offloaded the device's peak can
fall at another moment, so the categories of those rows add up to more than the peak.

GRPO's update step (made-up rollouts, a reference model) is compared the same way, with the reference model a
category of its own (the planner's `rl`, the dry run's frozen models); the planner's peak there is the update
step's, without what only the rollout holds (the KV cache, a weight-sync bucket).

Context parallelism (long rows; 4 of the model's layers, so that a whole row's attention runs in minutes) is
compared the same way, with the same layout without context parallelism beside the V3 row that has no
recomputation, to separate what CP adds from the rest of the model.

Usage (writes benchmarks/results/plan_vs_dryrun.json, prints Markdown tables; one to a few minutes per rank):
    python benchmarks/plan_vs_dryrun.py
    python benchmarks/plan_vs_dryrun.py --grpo-only   # the GRPO rows, the other rows kept from the last run
    python benchmarks/plan_vs_dryrun.py --cp-only     # the context-parallel rows, the other rows kept
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import write_results

from polytrain.config import build_config
from polytrain.dryrun.run import dry_run
from polytrain.models import preset
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import GiB, _stage_memory
from polytrain.plan.report import job_config

JOBS = [  # (model, layout, sequences per step: the fewest the layout's schedule takes)
    ("deepseek-v3-671b", Layout(dp=64, pp=16, ep=64, recompute="full", schedule="1f1b"), 1024),
    # the planner's picks for 910C clusters at 8M tokens a step (`polytrain plan ... --devices 256 / 1024`)
    ("deepseek-v3-671b", Layout(dp=256, ep=2, offload="all", recompute="selective"), 512),
    ("deepseek-v4-flash", Layout(dp=256, ep=2, offload="all", recompute="selective"), 256),
    ("deepseek-v4-pro", Layout(dp=1024, ep=128, offload="all", recompute="full"), 1024),
    # the V4-Pro pick since V4 runs tensor parallelism with sequence parallelism
    ("deepseek-v4-pro", Layout(dp=128, tp=2, pp=4, ep=128, zero=2, recompute="full", schedule="dualpipev"), 1024),
    # DualPipeV: 2 pp micro-batches, 2 pp + 1 half-stages in flight on every pipeline rank
    ("deepseek-v4-pro", Layout(dp=256, pp=4, ep=128, zero=2, recompute="full", schedule="dualpipev"), 2048),
]

# GRPO's update step (prompts of 1,024 tokens, completions of 2,048, 256 prompts x 8 a rollout: `polytrain plan
# --algorithm grpo`'s default job), at the planner's best runnable layouts (`polytrain plan --algorithm grpo
# --hardware ascend-910c --devices 256 / 1024 --emit-config`; the emitted config keeps a reference model)
GRPO_JOBS = [
    ("deepseek-v3-671b", Layout(dp=256, ep=2, offload="all", recompute="selective"), 2048),
    ("deepseek-v4-flash", Layout(dp=256, ep=256, recompute="selective"), 2048),
    ("deepseek-v4-flash", Layout(dp=256, ep=2, offload="all", recompute="selective"), 2048),
    ("deepseek-v4-pro", Layout(dp=1024, ep=128, recompute="full", micro_batch=2), 2048),
]

# context parallelism at the planner's picks for long rows (`polytrain plan --model ... --hardware ascend-910c
# --devices 1024 --seq-len 32768 / 65536`) and beside them; (model, layout, tokens per row), one row per data rank
CP_JOBS = [
    ("deepseek-v4-pro", Layout(dp=128, ep=128, cp=8, offload="all", recompute="full"), 65536),
    ("deepseek-v3-671b", Layout(dp=128, ep=64, cp=8, offload="all", recompute="full"), 32768),
    ("deepseek-v3-671b", Layout(dp=64, tp=2, ep=256, cp=8, offload="all", recompute="none"), 32768),
    ("deepseek-v3-671b", Layout(dp=512, tp=2, ep=256, offload="all", recompute="none"), 4096),
]
CP_LAYERS = 4


def compare(model: str, layout: Layout, sequences: int, algorithm: str = "sft", seq_len: int | None = None,
            layers: int | None = None) -> list[dict]:
    seq_len = seq_len or (3072 if algorithm == "grpo" else 4096)
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    job = Job(preset(model, **overrides), seq_len, seq_len * sequences, algorithm=algorithm)
    spec = job_config(job, layout)
    spec["model"].update(overrides)
    config = build_config(spec)
    rows = []
    for report in dry_run(config, layout.devices):
        stage = report.rank // (layout.devices // layout.pp)
        plan = _stage_memory(job, layout, stage)
        dry = report.peak_by_category
        # with everything offloaded, FSDP keeps this rank's shards, their gradients and the optimizer state in host
        # memory: both sides count them with the weights, and compare the device's peak
        host_grads = min(dry["gradients"], dry["parameters"]) if layout.offload == "all" else 0
        pairs = {
            "weights + optimizer": (plan.parameters + plan.optimizer + plan.host,
                                    dry["parameters"] + dry["optimizer state"] + host_grads),
            "gradients": (plan.gradients, dry["gradients"] - host_grads),
            "working set": (plan.activations + plan.transient,
                            dry["activations"] + dry["temporaries"] + dry["communication buffers"]),
        }
        if algorithm == "grpo":  # the reference model; the planner's peak is the update step's (no rollout)
            pairs["reference model"] = (plan.rl, dry["frozen models"])
        pairs["peak"] = (plan.peak, report.peak_bytes if report.device_peak_bytes is None
                         else report.device_peak_bytes)
        name = f"{layout.short()} {layout.schedule if layout.pp > 1 else ''}".strip()
        name += f", ZeRO-{layout.zero}" if layout.zero != 3 else ""
        name += ", offload all" if layout.offload == "all" else ""
        if layers is not None:
            name += f", {seq_len // 1024}K tokens, {layers} layers"
        rows.append({"model": model, "algorithm": algorithm, "layout": name + f", recompute {layout.recompute}",
                     "rank": report.rank, "stage": stage,
                     "gib": {name: {"planner": round(p / GiB, 2), "dryrun": round(d / GiB, 2),
                                    "ratio": round(p / d, 2) if d else None} for name, (p, d) in pairs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_vs_dryrun.json"))
    parser.add_argument("--grpo-only", action="store_true",
                        help="run only the GRPO rows (the other rows are kept from the existing --out file)")
    parser.add_argument("--cp-only", action="store_true",
                        help="run only the context-parallel rows (the others are kept from the existing --out file)")
    args = parser.parse_args()
    kept = json.loads(Path(args.out).read_text())["rows"] if args.grpo_only or args.cp_only else []
    if args.grpo_only or args.cp_only:
        rows = [r for r in kept if r.get("algorithm", "sft") == "sft" and not r.get("context")]
    else:
        rows = [row for model, layout, n in JOBS for row in compare(model, layout, n)]
    if args.cp_only:
        grpo = [r for r in kept if r.get("algorithm") == "grpo"]
    else:
        grpo = [row for model, layout, n in GRPO_JOBS for row in compare(model, layout, n, "grpo")]
    if args.grpo_only:
        long_rows = [r for r in kept if r.get("context")]
    else:
        long_rows = [{**row, "context": True} for model, layout, tokens in CP_JOBS
                     for row in compare(model, layout, layout.dp, seq_len=tokens, layers=CP_LAYERS)]
    print("| model, layout (SFT, 4K tokens) | stage | weights + optimizer | gradients | working set | peak |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{v['planner']:.1f} / {v['dryrun']:.1f}" for v in row["gib"].values()]
        print(f"| {row['model']}, {row['layout']} | {row['stage']} | " + " | ".join(cells) + " |")
    print("\n| model, layout (GRPO update, 3K tokens) | weights + optimizer | gradients | working set | reference "
          "model | peak |")
    print("|---|---|---|---|---|---|")
    for row in grpo:
        cells = [f"{v['planner']:.1f} / {v['dryrun']:.1f}" for v in row["gib"].values()]
        print(f"| {row['model']}, {row['layout']} | " + " | ".join(cells) + " |")
    print(f"\n| model, layout (SFT, long rows, {CP_LAYERS} layers) | weights + optimizer | gradients | working set | "
          "peak |")
    print("|---|---|---|---|---|")
    for row in long_rows:
        cells = [f"{v['planner']:.1f} / {v['dryrun']:.1f}" for v in row["gib"].values()]
        print(f"| {row['model']}, {row['layout']} | " + " | ".join(cells) + " |")
    print("(GiB per device: planner / dry run)")
    write_results(args.out, {"benchmark": "plan_vs_dryrun", "unit": "GiB per device",
                             "rows": rows + grpo + long_rows})


if __name__ == "__main__":
    main()
