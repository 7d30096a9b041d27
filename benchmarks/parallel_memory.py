"""Per-rank memory of model state under each parallel layout (gloo processes on the CPU).

For a small-but-not-trivial DeepSeek-V3-style preset, every layout builds the model, applies the layout, runs one
optimizer step and reports per rank: parameter bytes held locally, gradient bytes, AdamW state bytes, and the
process's peak RSS. FSDP over n ranks should hold ~1/n of the parameter bytes per rank; expert parallelism
splits the routed experts (the bulk of an MoE) over its ranks.

Usage: python benchmarks/parallel_memory.py [--out benchmarks/results/parallel_memory.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py
from ranks import run_ranks  # benchmarks/ranks.py

MODEL = dict(hidden_size=256, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=512,
             n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, n_group=4, topk_group=2)
LAYOUTS = [
    ("single process", 1, {}),
    ("dp_shard=2", 2, {}),
    ("dp_shard=4", 4, {}),
    ("dp_shard=4, ep=2", 4, {"ep": 2}),
    ("dp_shard=4, ep=4", 4, {"ep": 4}),
    ("dp_shard=2, tp=2", 4, {"tp": 2}),
    ("dp_shard=2, pp=2", 4, {"pp": 2}),
]


def worker(out: str, degrees: str) -> None:
    import torch
    from torch.distributed.tensor import DTensor

    from polytrain.backends import get_backend
    from polytrain.config import TrainConfig
    from polytrain.models import build_model, preset
    from polytrain.parallel.config import ParallelConfig
    from polytrain.parallel.runtime import ParallelRuntime
    from polytrain.train.optim import build_optimizer

    torch.set_num_threads(1)
    config = preset("tiny", **MODEL)
    runtime = ParallelRuntime(ParallelConfig(**json.loads(degrees)), config, get_backend("cpu"))
    model = runtime.parallelize(build_model(config, "cpu", seed=0), n_microbatches=2, rows=2, width=64)
    optimizer = build_optimizer(model, TrainConfig(), foreach=False)
    tokens = torch.randint(0, 128, (4, 64))
    if runtime.pipeline is not None:
        def loss(output, index: int) -> torch.Tensor:  # the last stage's loss of micro-batch `index` (2 rows each)
            return model.lm_head.loss_sum(output.hidden, tokens[2 * index : 2 * index + 2])

        positions, documents = torch.arange(64).expand(4, 64), torch.zeros(4, 64, dtype=torch.long)
        runtime.pipeline.run(tokens, positions, documents, loss, multi_document=False)
    else:
        model(tokens).float().pow(2).mean().backward()
    optimizer.step()

    def local_bytes(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    from polytrain.backends.base import host_memory

    report = {"rank": runtime.rank, "param_bytes": sum(local_bytes(p) for p in params),
              "grad_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
              "optimizer_bytes": sum(local_bytes(v) for v in state), "peak_rss_bytes": host_memory()[1]}
    Path(out, f"rank{runtime.rank}.json").write_text(json.dumps(report))
    runtime.close()


def measure(world: int, degrees: dict) -> list[dict]:
    return run_ranks(world, lambda folder: [sys.executable, __file__, "--worker", folder, json.dumps(degrees)], 300,
                     f"layout {degrees}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/parallel_memory.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    rows = []
    for name, world, degrees in LAYOUTS:
        ranks = measure(world, degrees)
        rows.append({"layout": name, "processes": world, "ranks": ranks})
    base = rows[0]["ranks"][0]["param_bytes"]
    print(f"{'layout':<20}{'params/rank (MiB)':>19}{'share':>8}{'grads':>9}{'AdamW':>9}{'peak RSS':>10}")
    for row in rows:
        worst = max(row["ranks"], key=lambda r: r["param_bytes"])
        row["largest_param_share"] = round(worst["param_bytes"] / base, 3)
        print(f"{row['layout']:<20}{worst['param_bytes'] / 2**20:>19.2f}{row['largest_param_share']:>8.2f}"
              f"{worst['grad_bytes'] / 2**20:>9.2f}{worst['optimizer_bytes'] / 2**20:>9.2f}"
              f"{max(r['peak_rss_bytes'] for r in row['ranks']) / 2**20:>10.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, {"benchmark": "parallel_memory", "model": MODEL, "rows": rows})


if __name__ == "__main__":
    main()
