"""The capacity planner against published runs and polytrain's own measured memory: prints the README's validation
table and writes it as JSON.

Usage: python benchmarks/plan_validation.py [--out benchmarks/results/plan_validation.json]
(about a minute on one CPU core: the memory rows train one step of two small models in-process)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import write_results  # benchmarks/provenance.py

from polytrain.models import preset, spec_for
from polytrain.plan.flops import flops_per_token
from polytrain.plan.hardware import load_chip
from polytrain.plan.layout import Job, Layout
from polytrain.plan.memory import GiB, device_memory
from polytrain.plan.search import evaluate, search
from polytrain.plan.timing import grpo_phases


def rows() -> list[dict]:
    from tests.unit.test_plan_memory import PRESETS, measured_peak

    out = []
    v3 = preset("deepseek-v3-671b")
    out.append({"case": "DeepSeek-V3 GFLOP/token, seq 4096, no MTP / 1 MTP",
                "predicted": [round(flops_per_token(v3, 4096, mtp=False).total / 1e9, 1),
                              round(flops_per_token(v3, 4096).total / 1e9, 1)], "published": [249.8, 260.0]})
    for name, recompute, rows_, seq in [("tiny", "none", 2, 256), ("tiny", "full", 4, 256),
                                        ("tiny", "selective", 4, 256), ("tiny-v4", "none", 2, 256),
                                        ("tiny-v4", "full", 2, 256)]:
        config = preset(name, **PRESETS[name])
        job = Job(config, seq, rows_ * seq, activation_bytes=4, mtp=False,
                  fused_attention=spec_for(config).planner.fused_attention)
        predicted = device_memory(job, Layout(micro_batch=rows_, recompute=recompute)).device
        measured = measured_peak(name, recompute, rows_, seq)
        out.append({"case": f"peak MiB, {name} (widened), AC {recompute}, {rows_} x {seq}",
                    "predicted": round(predicted / 2**20, 1), "measured": round(measured / 2**20, 1),
                    "error": round(predicted / measured - 1, 3)})
    h800 = load_chip("h800")
    job = Job(v3, 4096, 15360 * 4096, moment_bytes=2)
    plan = evaluate(job, Layout(dp=128, pp=16, ep=64, zero=1, schedule="dualpipe", recompute="selective"), h800)
    out.append({"case": "DeepSeek-V3, 2,048 H800, PP16 DualPipe EP64 ZeRO-1: tokens/s/GPU",
                "predicted": round(plan.time.tokens_per_s_per_device), "published": 1543,
                "mfu": round(plan.time.mfu, 3), "memory_gib": round(plan.memory.device / GiB, 1)})
    a2 = load_chip("ascend-910b")
    job = Job(v3, 4096, 64 * 4096)
    base = Layout(dp=64, pp=8, ep=64, zero=1)
    out.append({"case": "MindSpeed 671B SFT, 512 x 910B, TP1 PP8 EP64: GiB/device (none / full / swap / swap+full)",
                "predicted": [round(evaluate(job, base.with_(offload=o, recompute=r), a2).memory.device / GiB, 1)
                              for o, r in (("none", "none"), ("none", "full"), ("optimizer", "none"),
                                           ("optimizer", "full"))],
                "usable_gib": round(a2.memory_bytes * 0.92 / GiB, 1), "published": "runs with full recompute"})
    job = Job(v3, 1536, 512 * 1536, algorithm="grpo", prompt_len=128, response_len=1408)
    layout = Layout(dp=16, pp=16, ep=16, zero=1, recompute="full")
    plan = evaluate(job, layout, load_chip("h100"))
    out.append({"case": "DeepSeek-V3 GRPO, 256 H100 (NeMo-RL), s/step",
                "predicted": round(grpo_phases(job, layout, load_chip("h100"), plan.time).step, 1),
                "published": 154})
    job = Job(preset("deepseek-v4-pro"), 4096, 24_000_000)
    result = search(job, 1024, load_chip("ascend-910c"))
    best = result.plans[0]
    out.append({"case": "DeepSeek-V4-Pro, 1,024 910C, 24M tokens/step: best layout MFU, s/step",
                "predicted": [round(best.time.mfu, 3), round(best.time.step, 1)], "published": [0.349, 27],
                "layout": best.layout.short(), "layouts_searched": result.evaluated,
                "search_s": round(result.seconds, 2)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/plan_validation.json")
    args = parser.parse_args()
    table = rows()
    for row in table:
        print(json.dumps(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, {"benchmark": "plan_validation", "rows": table})


if __name__ == "__main__":
    main()
