"""Peak memory of `polytrain export` (streamed from the sharded checkpoint) against exporting through a full model.

Builds a run directory with one checkpoint of a ~100M-parameter model (fp32 weights + AdamW state), then exports it
to bf16 safetensors twice, each in a fresh process reporting its peak RSS: the streaming exporter, and the
straightforward way (load the whole model from the checkpoint, then write it).

Usage: python benchmarks/export_memory.py [--out benchmarks/results/export_memory.json]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py

MODEL = dict(hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=1536,
             n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=512, n_group=4, topk_group=2,
             q_lora_rank=128, kv_lora_rank=64, num_attention_heads=8, vocab_size=32000)
PEAK = "; from polytrain.backends.base import host_memory; print(host_memory()[1] // 1024)"
STREAM = "import sys, torch; from polytrain.train.export import export_run; export_run(sys.argv[1], sys.argv[2])"
FULL = ("import sys, torch; from polytrain.train.run_model import load_run_model; "
        "from polytrain.models.hf.checkpoint import save_hf; "
        "_, model, _ = load_run_model(sys.argv[1], 'cpu'); save_hf(model, sys.argv[2])")


def make_run(root: Path) -> tuple[int, int]:
    import torch

    from polytrain.config import build_config, config_to_toml
    from polytrain.models import build_model
    from polytrain.train.checkpoint import Checkpointer
    from polytrain.train.optim import build_optimizer

    config = build_config({"data": {"train_path": "x", "tokenizer": "y"}, "model": {"preset": "tiny", **MODEL},
                           "run": {"output_dir": str(root)}})
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.toml").write_text(config_to_toml(config))
    model = build_model(config.model, "cpu", seed=0)
    optimizer = build_optimizer(model, config.train)
    model(torch.randint(0, 1000, (1, 16))).float().mean().backward()
    optimizer.step()
    Checkpointer(root / "checkpoints", keep_last=1).save(1, model, optimizer, {"loader": {}}, {})
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.stat().st_size for p in (root / "checkpoints").rglob("*") if p.is_file())
    return params, size


def peak_of(code: str, *args: str) -> tuple[float, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code + PEAK, *args], check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1]) / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/export_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        params, size = make_run(run_dir)
        baseline, _ = peak_of("import torch, polytrain.train.export, polytrain.models.hf.checkpoint")
        stream, stream_s = peak_of(STREAM, str(run_dir), str(Path(tmp) / "streamed"))
        full, full_s = peak_of(FULL, str(run_dir), str(Path(tmp) / "full"))
    result = {"benchmark": "export_memory", "parameters": params, "checkpoint_mib": round(size / 2**20, 1),
              "model_fp32_mib": round(params * 4 / 2**20, 1), "baseline_rss_mib": round(baseline, 1),
              "streamed_peak_rss_mib": round(stream, 1), "streamed_seconds": round(stream_s, 1),
              "full_model_peak_rss_mib": round(full, 1), "full_model_seconds": round(full_s, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(f"model: {params / 1e6:.1f}M parameters ({result['model_fp32_mib']} MiB fp32); checkpoint with AdamW "
          f"state: {result['checkpoint_mib']} MiB; Python + torch baseline {baseline:.0f} MiB")
    print(f"streamed export:   peak RSS {stream:.0f} MiB ({stream - baseline:.0f} MiB over baseline), {stream_s:.1f} s")
    print(f"full-model export: peak RSS {full:.0f} MiB ({full - baseline:.0f} MiB over baseline), {full_s:.1f} s")


if __name__ == "__main__":
    main()
