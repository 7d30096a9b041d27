"""The planner's per-device memory against the dry run's, category by category, at real size.

For each job (a model, a layout on 1,024 or 256 ranks of a 910C cluster) the planner's prediction for a pipeline
stage (plan/memory.py) is set beside `polytrain dryrun`'s measurement of the rank running that stage (one SFT step
through the engine, on tensors without storage). The categories are matched as follows:

- weights and optimizer: the planner's parameters + optimizer state (bf16 copies, fp32 master weights, moments);
  the dry run's parameters (this rank's fp32 shards) + optimizer state (moments);
- gradients: both count the sharded gradients and, between micro-batches, the unsharded ones FSDP accumulates;
- working set: the planner's activations + transient (gathered layers, recomputation, logits, buffers); the dry
  run's activations + temporaries + communication buffers;
- peak: the planner's device peak; the dry run's peak of all live tensors (no allocator slack).

Usage (writes benchmarks/results/plan_vs_dryrun.json, prints a Markdown table; about 5 minutes):
    python benchmarks/plan_vs_dryrun.py
"""

from __future__ import annotations

import argparse
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

JOBS = [  # (model, layout, sequences per step)
    ("deepseek-v3-671b", Layout(dp=64, pp=16, ep=64, recompute="full", schedule="1f1b"), 1024),
    ("deepseek-v4-flash", Layout(dp=256, ep=64, recompute="full"), 512),
    ("deepseek-v4-pro", Layout(dp=1024, ep=128, recompute="full", micro_batch=4), 4096),
]


def compare(model: str, layout: Layout, sequences: int) -> list[dict]:
    job = Job(preset(model), 4096, 4096 * sequences)
    config = build_config(job_config(job, layout))
    rows = []
    for report in dry_run(config, layout.devices):
        stage = report.rank // (layout.devices // layout.pp)
        plan = _stage_memory(job, layout, stage)
        dry = report.peak_by_category
        pairs = {
            "weights + optimizer": (plan.parameters + plan.optimizer,
                                    dry["parameters"] + dry["optimizer state"]),
            "gradients": (plan.gradients, dry["gradients"]),
            "working set": (plan.activations + plan.transient,
                            dry["activations"] + dry["temporaries"] + dry["communication buffers"]),
            "peak": (plan.peak, report.peak_bytes),
        }
        rows.append({"model": model, "layout": f"{layout.short()} {layout.schedule if layout.pp > 1 else ''}".strip()
                     + f", recompute {layout.recompute}", "rank": report.rank, "stage": stage,
                     "gib": {name: {"planner": round(p / GiB, 2), "dryrun": round(d / GiB, 2),
                                    "ratio": round(p / d, 2) if d else None} for name, (p, d) in pairs.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "plan_vs_dryrun.json"))
    args = parser.parse_args()
    rows = [row for model, layout, sequences in JOBS for row in compare(model, layout, sequences)]
    print("| model, layout | stage | weights + optimizer | gradients | working set | peak |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{v['planner']:.1f} / {v['dryrun']:.1f}" for v in row["gib"].values()]
        print(f"| {row['model']}, {row['layout']} | {row['stage']} | " + " | ".join(cells) + " |")
    print("(GiB per device: planner / dry run)")
    write_results(args.out, {"benchmark": "plan_vs_dryrun", "unit": "GiB per device", "rows": rows})


if __name__ == "__main__":
    main()
