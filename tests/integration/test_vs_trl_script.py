"""benchmarks/vs_trl.py end to end on a tiny model: polytrain's trainer and TRL's SFT, DPO and GRPO trainers start
from the same exported weights and agree at step 0; the JSON has the docs table's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_vs_trl_quick_run_agrees_at_step_zero(tmp_path):
    out = tmp_path / "vs_trl.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--quick", "--steps", "1", "--warmup", "0",
         "--grpo-steps", "1", "--grpo-warmup", "0", "--repeats", "1", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    tasks = ("sft", "dpo", "dpo_precomputed", "grpo")
    assert set(summary["results"]) == set(tasks)
    for task in tasks:
        check = summary["step0"][task]
        assert check["agree"] and check["difference"] <= check["tolerance"], (task, check)
        ratios = summary["polytrain_vs_trl"][task]
        assert ratios["speedup"] > 0 and ratios["memory_ratio"] > 0
    sft = summary["step0"]["sft"]
    assert sft["tolerance"] == 1e-4 and sft["compared"] == "loss"
    # DPO: the chosen log-probabilities both losses start from are the same numbers (not only log 2 = log 2)
    ours, peer = (summary["results"]["dpo"][side]["step0"]["chosen_logp"] for side in ("polytrain", "trl"))
    assert ours < -1 and abs(ours - peer) < 1e-3
    grpo = summary["results"]["grpo"]
    for side in ("polytrain", "trl"):
        assert 0 < grpo[side]["generation_s"] < grpo[side]["step_time_s"] and grpo[side]["peak_rss_gib"] > 0.1
    assert "vs_trl" not in summary.get("failed", {})
    assert "sft: polytrain x" in result.stdout and summary["versions"]["trl"].startswith("1.16")
