"""Peak host memory per rank while a job starts from a Hugging Face checkpoint, against the checkpoint's size.

Writes one safetensors checkpoint of S bytes (a widened tiny DeepSeek-V3 model, fp32), then starts `polytrain sft`'s
Trainer on it (build on the meta device, lay out, allocate this rank's shards, read only their slices) as 1 process
and as 4 gloo processes (dp_shard=4, and dp_shard=4 with ep=2), each rank reporting its peak RSS (VmHWM) over its
own baseline (the same process after importing torch and polytrain) once the Trainer is built. A rank that held the
whole model would need at least S over its baseline; a sharded start-up needs about S / ranks.

Usage: python benchmarks/startup_memory.py [--hidden 1024] [--out benchmarks/results/startup_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provenance import write_results  # noqa: E402 - benchmarks/provenance.py

LAYOUTS = [(1, {}), (4, {"dp_shard": 4}), (4, {"dp_shard": 4, "ep": 2})]


def model_table(hidden: int) -> dict:
    """A widened `tiny` (the shipped tokenizer's 128-token vocabulary): most bytes in the routed experts."""
    return dict(preset="tiny", hidden_size=hidden, num_hidden_layers=4, first_k_dense_replace=1,
                intermediate_size=hidden, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=2 * hidden,
                n_group=4, topk_group=2, q_lora_rank=hidden // 4, kv_lora_rank=hidden // 8, num_attention_heads=8,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)


def make_checkpoint(path: Path, hidden: int) -> int:
    """Write the model's HF checkpoint (fp32) to `path`; returns its bytes."""
    import torch

    from polytrain.models import build_model, model_config_from_table
    from polytrain.models.hf import save_hf

    model = build_model(model_config_from_table(model_table(hidden)), "cpu", seed=1)
    save_hf(model, path, dtype=torch.float32, max_shard_bytes=512 * 2**20)
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def job(checkpoint: Path, out: Path, layout: dict) -> dict:
    examples = ROOT / "examples"
    return {"run": {"output_dir": str(out), "precision": "fp32"}, "init": {"hf_path": str(checkpoint)},
            "model": {"num_nextn_predict_layers": 0},
            "data": {"train_path": str(examples / "data" / "train.jsonl"),
                     "tokenizer": str(examples / "tokenizer" / "tokenizer.json"), "max_seq_len": 64},
            "train": {"global_batch_size": 8, "micro_batch_size": 2, "steps": 1},
            "log": {"tensorboard": False, "progress": False}, "parallel": layout}


def worker(spec: str, report: str) -> None:
    """One rank: the Trainer's start-up, then its peak RSS over the baseline it had before."""
    import torch

    from polytrain.backends.base import host_memory
    from polytrain.config import build_config
    from polytrain.train.trainer import Trainer

    torch.set_num_threads(1)
    baseline = host_memory()[1]
    trainer = Trainer(build_config(json.loads(spec)), overwrite=True)
    peak = host_memory()[1]
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in trainer.model.parameters())
    Path(report, f"rank{trainer.runtime.rank}.json").write_text(json.dumps(
        {"rank": trainer.runtime.rank, "baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20,
         "over_baseline_mib": (peak - baseline) / 2**20, "local_parameters_mib": local / 2**20}))
    trainer.runtime.close()
    from polytrain.parallel.runtime import exit_process

    exit_process(0)  # not through the interpreter's shutdown (see there)


def launch(world: int, argv: list[str], timeout: float = 600) -> None:
    """Run `python argv...` as `world` gloo ranks (the environment torchrun sets, one thread each); raise with
    the failing ranks' stderr."""
    sys.path.insert(0, str(ROOT))
    from tests.distributed.harness import free_port

    port, procs = free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(e[-2000:] for p, e in zip(procs, errors) if p.returncode))


def start(checkpoint: Path, root: Path, world: int, layout: dict) -> list[dict]:
    """Each rank's report of the Trainer's start-up from `checkpoint` under `layout`."""
    reports = root / f"reports-{world}-{'-'.join(f'{k}{v}' for k, v in layout.items()) or 'single'}"
    reports.mkdir()
    spec = json.dumps(job(checkpoint, reports / "run", layout))
    launch(world, [__file__, "--worker", spec, str(reports)])
    return [json.loads((reports / f"rank{r}.json").read_text()) for r in range(world)]


def measure(hidden: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = make_checkpoint(root / "hf", hidden)
        rows = []
        for world, layout in LAYOUTS:
            ranks = start(root / "hf", root, world, layout)
            worst = max(r["over_baseline_mib"] for r in ranks)
            rows.append({"processes": world, "layout": layout or {"single process": True}, "ranks": ranks,
                         "worst_over_baseline_mib": round(worst, 1),
                         "checkpoint_share_mib": round(size / world / 2**20, 1)})
    return {"benchmark": "startup_memory", "model": model_table(hidden), "checkpoint_mib": round(size / 2**20, 1),
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="model width (checkpoint size grows as its square)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup_memory.json"))
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "REPORTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    result = measure(args.hidden)
    print(f"checkpoint {result['checkpoint_mib']:.0f} MiB")
    print(f"{'layout':<28}{'share of S':>12}{'worst rank over baseline':>28}")
    for row in result["rows"]:
        print(f"{json.dumps(row['layout']):<28}{row['checkpoint_share_mib']:>10.0f}Mi"
              f"{row['worst_over_baseline_mib']:>26.0f}Mi")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
