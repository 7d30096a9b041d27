"""Print the headline figure of every benchmark's results file as one Markdown table (the README's and
docs/performance.md's results table): the figure, the command that measures it, the file, its commit and date.

Usage: python scripts/results_summary.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _vs_transformers(d: dict[str, Any]) -> str:
    ours = d["results"]["polytrain"]
    peer = d["peer_fastest"].removeprefix("transformers (").removesuffix(")")
    return (f"x{d['speedup_vs_fastest_peer']:.2f} tokens/s and x{d['memory_ratio_vs_fastest_peer']:.2f} peak memory "
            f"vs transformers' fastest setting ({peer}); {ours['mfu_vs_measured_matmul']:.1%} of the measured matmul "
            "peak")


def _vs_trl(d: dict[str, Any]) -> str:
    names = {"sft": "SFT", "dpo": "DPO", "dpo_precomputed": "DPO (precomputed reference)", "grpo": "GRPO"}
    cells = [f"{names[task]} x{r['speedup']:.2f} at x{r['memory_ratio']:.2f} memory"
             for task, r in d["polytrain_vs_trl"].items()]
    return "vs TRL, same model and data, throughput: " + "; ".join(cells)


def _gemm_shapes(d: dict[str, Any]) -> str:
    return f"MFU ceiling of the same model's GEMM shapes: {d['ceiling']['ceiling_mfu']:.1%}"


def _bench(d: dict[str, Any]) -> str:
    return (f"tiny demo job: {d['tokens_per_s']:,.0f} tokens/s, {d['mfu']:.1%} of the measured "
            f"{d['precision']} matmul peak")


def _decode(d: dict[str, Any]) -> str:
    return (f"MLA absorbed decode x{d['speedup']:.1f} the expanded one "
            f"({d['results']['absorbed']['decode_tokens_per_s']:.0f} vs "
            f"{d['results']['expanded']['decode_tokens_per_s']:.0f} tokens/s)")


def _decode_v4(d: dict[str, Any]) -> str:
    v4 = d["deepseek_v4"]
    return (f"DeepSeek-V4 cached decode x{v4['speedup']:.1f} recomputing the sequence "
            f"({v4['cached']['decode_tokens_per_s']:.0f} vs {v4['recompute']['decode_tokens_per_s']:.0f} tokens/s), "
            f"logits within {v4['max_logit_diff']:.0e}")


def _v4_attention(d: dict[str, Any]) -> str:
    cells = []
    for row in d["rows"]:
        block, dense = row["block"], row["dense"]
        vs = (f" (dense {dense['peak_mib']:,.0f} MiB, {dense['seconds']:.1f} s)" if "peak_mib" in dense
              else "")
        cells.append(f"{row['layer'].split(' ')[0]} {row['tokens'] // 1024}K: {block['peak_mib']:,.0f} MiB, "
                     f"{block['seconds']:.1f} s{vs}")
    return "DeepSeek-V4 attention layer forward + backward, block-wise (dense only where it fits): " + "; ".join(cells)


def _context_parallel(d: dict[str, Any]) -> str:
    longest = max(row["tokens"] for row in d["rows"])
    rows = {row["cp"]: row for row in d["rows"] if row["tokens"] == longest and row["case"] != "cp=1 plain"}
    cells = [f"cp={cp}: {row['activation_mib']:,.0f} MiB (x{row['activation_vs_cp1_cp_path']:.2f}), peak "
             f"{row['peak_mib']:,.0f} MiB" for cp, row in sorted(rows.items())]
    return f"context parallelism, activations per rank at {longest:,} tokens (V3-architecture model): " + "; ".join(
        cells)


def _convert(d: dict[str, Any]) -> str:
    rows = d["rows"]
    return ("FP8 -> bf16 conversion peak over baseline: " + " / ".join(
        f"{r['peak_over_baseline_mib']:.0f} MiB for {r['checkpoint_mib'] / 1024:.1f} GiB" for r in rows)
            + " (flat in checkpoint size)")


def _export(d: dict[str, Any]) -> str:
    over = d["streamed_peak_rss_mib"] - d["baseline_rss_mib"]
    full = d["full_model_peak_rss_mib"] - d["baseline_rss_mib"]
    return (f"streamed export of a {d['checkpoint_mib'] / 1024:.1f} GiB checkpoint: {over:.0f} MiB over baseline "
            f"({full:.0f} MiB loading the model whole)")


def _parallel(d: dict[str, Any]) -> str:
    shares = {row["layout"]: row["largest_param_share"] for row in d["rows"]}
    return "share of the parameters per rank: " + "; ".join(f"{name}: {share:.2f}" for name, share in shares.items()
                                                            if name != "single process")


def _startup(d: dict[str, Any]) -> str:
    rows = [r for r in d["rows"] if r["processes"] > 1]
    worst = ", ".join(f"{', '.join(f'{k}={v}' for k, v in r['layout'].items())}: {r['worst_over_baseline_mib']:.0f}"
                      for r in rows)
    single = next(r for r in d["rows"] if r["processes"] == 1)["worst_over_baseline_mib"]
    return (f"start-up from a {d['checkpoint_mib'] / 1024:.1f} GiB HF checkpoint, peak per rank over baseline "
            f"(MiB): 1 process: {single:.0f}; 4 ranks, {worst} (share S / 4 = {rows[0]['checkpoint_share_mib']:.0f})")


def _data(d: dict[str, Any]) -> str:
    over = {(r["format"], r["mode"]): r["loaded_peak_over_baseline_mib"] for r in d["rows"]}
    return (f"loading {d['conversations']:,} conversations, peak over baseline: JSONL {over['jsonl', 'store']:.0f} "
            f"MiB through the token store ({over['jsonl', 'eager']:.0f} MiB holding records and tensors), Parquet "
            f"{over['parquet', 'store']:.0f} MiB ({over['parquet', 'eager']:.0f} MiB)")


def _plan(d: dict[str, Any]) -> str:
    errors = [abs(row["error"]) for row in d["rows"] if "error" in row]
    return f"planner vs measured peak memory: worst error {max(errors):.1%} ({len(errors)} cases)"


def _plan_vs_dryrun(d: dict[str, Any]) -> str:
    cells = [f"{row['model'].removeprefix('deepseek-')} {row['layout'].split(',')[0]} stage {row['stage']}: "
             f"{row['gib']['peak']['ratio'] - 1:+.0%}" for row in d["rows"]]
    return "planner vs dry run, peak per device at real size: " + "; ".join(cells)


def _audit(d: dict[str, Any]) -> str:
    return f"audit: {d['lines_per_s']:,.0f} lines/s over {d['total_lines']:,} lines (torch + transformers)"


BENCHMARKS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("vs_transformers", "python benchmarks/vs_transformers.py --profile", _vs_transformers),
    ("vs_trl", "python benchmarks/vs_trl.py --profile", _vs_trl),
    ("gemm_shapes", "python benchmarks/gemm_shapes.py", _gemm_shapes),
    ("bench_cpu_tiny", "polytrain bench examples/sft_tiny.toml --steps 20", _bench),
    ("decode_speed", "python benchmarks/decode_speed.py", _decode),
    ("decode_speed", "python benchmarks/decode_speed.py", _decode_v4),
    ("v4_attention", "python benchmarks/v4_attention.py", _v4_attention),
    ("context_parallel", "python benchmarks/context_parallel.py", _context_parallel),
    ("parallel_memory", "python benchmarks/parallel_memory.py", _parallel),
    ("startup_memory", "python benchmarks/startup_memory.py", _startup),
    ("convert_memory", "python benchmarks/convert_memory.py", _convert),
    ("export_memory", "python benchmarks/export_memory.py", _export),
    ("data_memory", "python benchmarks/data_memory.py", _data),
    ("plan_validation", "python benchmarks/plan_validation.py", _plan),
    ("plan_vs_dryrun", "python benchmarks/plan_vs_dryrun.py", _plan_vs_dryrun),
    ("audit_speed", "python benchmarks/audit_speed.py", _audit),
]


def table(results: Path) -> str:
    lines = ["| result | command | file (commit, date) |", "|---|---|---|"]
    for name, command, headline in BENCHMARKS:
        path = results / f"{name}.json"
        data = json.loads(path.read_text())
        where = f"`{path.relative_to(ROOT)}` ({data.get('commit', '?')}, {str(data.get('date', '?'))[:10]})"
        lines.append(f"| {headline(data)} | `{command}` | {where} |")
    machines = {json.loads((results / f"{name}.json").read_text()).get("machine", "?") for name, _, _ in BENCHMARKS}
    lines += ["", "Machine: " + "; ".join(sorted(machines)) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    print(table(Path(args.results).resolve()))


if __name__ == "__main__":
    main()
