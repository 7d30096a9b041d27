"""`polytrain plan` as a user runs it: table, JSON, an emitted config `polytrain sft` accepts, calibration, and
bad input answered in one line with exit code 2."""

from __future__ import annotations

import json

from polytrain.config import tomllib
from polytrain.plan.hardware import load_chip
from tests.e2e.test_cli import polytrain

JOB = ["plan", "--model", "deepseek-v4-flash", "--hardware", "h100", "--devices", "64", "--global-batch-tokens", "4M"]


def test_table_with_breakdown_for_two_chips_side_by_side_and_grpo_phases():
    out = polytrain(*JOB, "--top", "3", "--compare-hardware", "ascend-910b", "--algorithm", "grpo").stdout
    assert " MTP (" in out.splitlines()[0]  # the parameter count says what it includes
    assert "tok/s/dev" in out and "MFU" in out and "searched" in out
    assert "best: DP" in out and "memory/device" in out and "step" in out
    assert "x h100" in out and "x ascend-910b" in out
    assert "GRPO step" in out and "rollout" in out and "weight sync" in out


def test_json_and_emitted_config_accepted_by_sft(tmp_path):
    emitted = tmp_path / "best.toml"
    doc = json.loads(polytrain(*JOB, "--json", "--top", "2", "--emit-config", str(emitted)).stdout)
    best = doc["plans"][0]
    assert doc["layouts_searched"] > 100 and best["fits"] and best["runs_on_polytrain"]
    assert best["time"]["tokens_per_s_per_device"] > 0 and 0 < best["time"]["mfu"] < 1
    printed = tomllib.loads(polytrain("sft", str(emitted), "--print-config").stdout)
    layout = best["layout"]
    assert printed["parallel"]["ep"] == layout["ep"] and printed["parallel"]["pp"] == layout["pp"]
    assert printed["parallel"]["dp_shard"] == layout["dp"]
    assert printed["model"]["hidden_size"] == 4096  # the deepseek-v4-flash preset


def test_calibrate_writes_a_chip_file_plan_accepts(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"backend": "cpu", "device": "x", "tokens_per_s": 1.0e4, "world_size": 1,
                                 "achieved_flops_per_s": 2.0e11, "peak_flops_per_s": 1e12, "mfu": 0.2}))
    chip = tmp_path / "my-cpu.toml"
    assert "-> 0.2" in polytrain("plan", "--calibrate", str(bench), "--hardware", "cpu", "--out", str(chip)).stdout
    assert load_chip(str(chip)).compute_efficiency == 0.2


def test_bad_input_exits_2_with_one_line():
    cases = [
        (["--hardware", "h900"], "unknown hardware `h900`"),
        (["--devices", "8", "--model", "deepseek-v4-pro"], "fits on"),
        (["--devices", "0"], "--devices must be at least 1, got 0"),
    ]
    for extra, message in cases:
        args = [*JOB]
        for key, value in zip(extra[::2], extra[1::2]):
            args[args.index(key) + 1] = value
        result = polytrain(*args, check=False)
        assert result.returncode == 2, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, result.stderr)
    for extra, message in [(["--rollout-devices", "8"], "--rollout-devices is for --algorithm grpo"),
                           (["--algorithm", "grpo", "--rollout-devices", "2"], "do not fit on 2 x h100")]:
        result = polytrain(*JOB, *extra, check=False)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
