"""Peak host memory of `polytrain convert` (FP8 -> bf16) against shard size and shard count.

Builds synthetic FP8 checkpoints (E4M3 weights with 128x128 fp32 `_scale_inv` blocks, V3 naming) of N shards of
about S MiB each, converts each in a fresh process, and reads that process's peak RSS. Streaming conversion should
keep the peak flat as N grows and within a small multiple of one shard.

Usage: python benchmarks/convert_memory.py [--shard-mib 256] [--shards 2 8] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import write_results  # benchmarks/provenance.py
from safetensors.torch import save_file

from polytrain.models import preset
from polytrain.models.hf.config import hf_config_from_model

SIDE = 2048  # each weight is SIDE x SIDE fp8 = 4 MiB


def make_checkpoint(root: Path, shards: int, shard_mib: int) -> int:
    per_shard = max(1, shard_mib * 2**20 // (SIDE * SIDE))
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for s in range(shards):
        tensors = {}
        for t in range(per_shard):
            name = f"model.layers.{s}.mlp.experts.{t}.gate_proj.weight"
            tensors[name] = (torch.randn(SIDE, SIDE, generator=generator) * 10).to(torch.float8_e4m3fn)
            tensors[name + "_scale_inv"] = torch.rand(SIDE // 128, SIDE // 128, generator=generator)
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(root / file))
        weight_map.update(dict.fromkeys(tensors, file))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = hf_config_from_model(preset("tiny-v3"))
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (root / "config.json").write_text(json.dumps(config))
    return max(p.stat().st_size for p in root.glob("*.safetensors"))


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent, VmHWM restarts at exec.
PEAK = "; from polytrain.backends.base import host_memory; print(host_memory()[1] // 1024)"


def peak_rss_of(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `code` run in a fresh Python process (which reports its own peak)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code + PEAK, *args], check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024, time.perf_counter() - started


def measure(shards: int, shard_mib: int) -> dict:
    code = (
        "import sys, torch; from polytrain.models.hf.checkpoint import convert_checkpoint; "
        "convert_checkpoint(sys.argv[1], sys.argv[2], torch.bfloat16)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fp8"
        source.mkdir()
        largest = make_checkpoint(source, shards, shard_mib)
        total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        peak, seconds = peak_rss_of(code, str(source), str(Path(tmp) / "bf16"))
        shutil.rmtree(source)
    return {"shards": shards, "largest_shard_mib": round(largest / 2**20, 1), "checkpoint_mib": round(total / 2**20, 1),
            "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-mib", type=int, default=256)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--out", default="benchmarks/results/convert_memory.json")
    args = parser.parse_args()
    baseline, _ = peak_rss_of("import torch, polytrain.models.hf.checkpoint")
    rows = [measure(n, args.shard_mib) for n in args.shards]
    for row in rows:
        row["peak_over_baseline_mib"] = round(row["peak_rss_mib"] - baseline, 1)
        row["peak_over_baseline_per_largest_shard"] = round(row["peak_over_baseline_mib"] / row["largest_shard_mib"], 2)
    result = {"benchmark": "convert_memory", "baseline_rss_mib": round(baseline, 1), "rows": rows,
              "command": " ".join(sys.argv), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(f"baseline (python + torch + polytrain imported): {baseline:.0f} MiB")
    print(f"{'shards':>7}{'largest shard':>15}{'checkpoint':>12}{'peak RSS':>10}{'over baseline':>15}{'/ shard':>9}")
    for row in rows:
        print(f"{row['shards']:>7}{row['largest_shard_mib']:>13.0f}Mi{row['checkpoint_mib']:>10.0f}Mi"
              f"{row['peak_rss_mib']:>8.0f}Mi{row['peak_over_baseline_mib']:>13.0f}Mi"
              f"{row['peak_over_baseline_per_largest_shard']:>9.2f}")


if __name__ == "__main__":
    main()
