"""`polytrain dryrun`: one training step of a real-size job for chosen ranks of a fake world, in one process.

- Against a real 4-process gloo run of the same job (dp_shard 2 x cp 2, ep 2): the same parameter and optimizer
  bytes on every rank.
- Fake tensors against real ones (one rank; SFT, and GRPO's update step with its reference model): the same peak,
  category by category.
- DeepSeek-V3-671B on 1,024 ranks: each role's parameter bytes are exactly the planner's count of its pipeline
  stage's parameters (an independent count, models/params.py) over the 64 data-parallel shards, in fp32, and its
  peak is within 10% of the planner's.
- A layout the engine refuses fails with the engine's own message; the command line prints the report.

The planner's picks in the dry run: tests/distributed/test_dryrun_vs_planner.py.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from tests.conftest import EXAMPLES, ROOT, TOKENIZER

sys.path.insert(0, str(ROOT / "benchmarks"))
startup_memory = importlib.import_module("startup_memory")


def job(preset: str, parallel: dict, gbs: int, seq: int = 64, algorithm: str = "sft", **model) -> dict:
    return {"run": {"algorithm": algorithm, "precision": "fp32"}, "model": {"preset": preset, **model},
            "parallel": parallel, "log": {"tensorboard": False, "progress": False},
            "data": {"train_path": str(EXAMPLES / "data" / "train.jsonl"), "tokenizer": str(TOKENIZER),
                     "max_seq_len": seq, "packing": False},
            "train": {"global_batch_size": gbs, "micro_batch_size": 1, "steps": 1}}


REAL_STEP = """
import json, sys
from pathlib import Path
from polytrain.config import build_config
from polytrain.train.trainer import Trainer

def local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total

trainer = Trainer(build_config(json.loads(sys.argv[1])), overwrite=True)
trainer.train_step()
state = [v for s in trainer.optimizer.state.values() for v in s.values() if hasattr(v, "dim") and v.dim() > 0]
Path(sys.argv[2], f"rank{trainer.runtime.rank}.json").write_text(json.dumps(
    {"parameters": local_bytes(trainer.model.parameters()), "optimizer": local_bytes(state)}))
trainer.runtime.close()
"""


def test_dry_run_reports_the_bytes_of_a_real_4_rank_run(tmp_path):
    from polytrain.config import build_config
    from polytrain.dryrun.run import dry_run

    # dp_shard 2 x cp 2: FSDP over the 4 ranks, experts over ep 2 of them, the rows' latents gathered over cp
    spec = job("tiny-v3", {"dp_shard": 2, "cp": 2, "ep": 2}, gbs=8)
    spec["run"]["output_dir"] = str(tmp_path / "run")
    startup_memory.launch(4, ["-c", REAL_STEP, json.dumps(spec), str(tmp_path)])
    real = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    dry = dry_run(build_config(spec), 4, [0, 1, 2, 3])
    assert [(r.parameter_bytes, r.optimizer_bytes) for r in dry] == [(r["parameters"], r["optimizer"]) for r in real]
    assert all(r.peak_bytes > r.parameter_bytes + r.optimizer_bytes for r in dry)
    groups = {call["group"] for call in dry[0].collectives}
    assert {"dp_shard x cp", "cp", "ep"} <= groups, groups


@pytest.mark.parametrize(("preset", "algorithm"), [("tiny-v3", "sft"), ("tiny-v4", "sft"), ("tiny-v3", "grpo")])
def test_fake_tensors_account_like_real_ones(preset, algorithm):
    from polytrain.config import build_config
    from polytrain.dryrun.run import run_rank

    spec = job(preset, {}, gbs=4, algorithm=algorithm)
    if algorithm == "grpo":  # the update step on 4 prompts x 2 completions, with a KL term to a reference model
        spec["grpo"] = {"group_size": 2, "max_new_tokens": 16, "kl_coef": 0.1, "rewards": ["exact_match"]}
    config = build_config(spec)
    fake, real = (run_rank(config, 1, 0, "the rank", fake_tensors=flag) for flag in (True, False))
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.01)
    for name, size in real.peak_by_category.items():
        assert fake.peak_by_category[name] == pytest.approx(size, rel=0.01, abs=2**20), name
    assert fake.parameter_bytes == real.parameter_bytes and fake.optimizer_bytes == real.optimizer_bytes
    assert (fake.peak_by_category["frozen models"] > 0) == (algorithm == "grpo")


def test_deepseek_v3_671b_on_1024_ranks_holds_exactly_its_shard_and_peaks_where_the_planner_says():
    from polytrain.config import build_config
    from polytrain.dryrun.run import dry_run
    from polytrain.models import preset
    from polytrain.plan.layout import Job, Layout
    from polytrain.plan.memory import _stage_memory
    from polytrain.plan.report import job_config

    job = Job(preset("deepseek-v3-671b"), 4096, 4096 * 1024)
    layout = Layout(dp=64, pp=16, ep=64, recompute="full", schedule="1f1b")
    reports = dry_run(build_config(job_config(job, layout)), 1024)
    assert [r.rank for r in reports] == [0, 960]  # the first and the last pipeline stage
    for report, stage in zip(reports, (0, 15)):
        dense, experts = job.shape.stage_params(16, stage)
        assert report.parameter_bytes == 4 * (dense // 64 + experts // 64), stage
        assert report.optimizer_bytes == 2 * report.parameter_bytes  # AdamW: two fp32 moments
        assert any(call["group"] == "ep" and call["op"] == "all_to_all_single" for call in report.collectives)
        # the planner's memory model of a pipeline stage (gathered stage, receive buffers, unsharded gradients,
        # in-flight micro-batches) against the engine's: measured within 1% (stage 0) and 4% (stage 15)
        plan = _stage_memory(job, layout, stage)
        assert abs(plan.peak / report.peak_bytes - 1) <= 0.10, (stage, plan.peak / 2**30, report.peak_bytes / 2**30)


def test_the_engines_refusal_and_the_command_line(tmp_path):
    config = tmp_path / "job.toml"
    import tomli_w

    config.write_text(tomli_w.dumps(job("tiny", {"dp_shard": 4}, gbs=6)))
    command = [sys.executable, "-m", "polytrain", "dryrun", str(config), "--world-size", "4"]
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: train.global_batch_size = 6 must be a multiple of data-parallel ranks x train.micro_batch_size = "
        "4 x 1")
    ok = subprocess.run([*command, "--set", "train.global_batch_size=8"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "rank 0 of 4" in ok.stdout and "dp_shard" in ok.stdout and "peak" in ok.stdout
