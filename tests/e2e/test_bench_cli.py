"""`polytrain bench`: timed real training steps, figures that hang together, side-by-side comparison, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, TOKENIZER
from tests.e2e.test_cli import polytrain


@pytest.fixture(scope="module")
def bench_job(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    lines = (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:64]) + "\n")
    (root / "job.toml").write_text(f"""
[run]
output_dir = "{root / 'must-not-exist'}"
[model]
preset = "tiny"
num_hidden_layers = 2
[data]
train_path = "train.jsonl"
tokenizer = "{TOKENIZER}"
max_seq_len = 64
[train]
steps = 100
global_batch_size = 8
micro_batch_size = 4
""")
    return root / "job.toml"


def test_bench_reports_consistent_figures_and_leaves_no_run_behind(bench_job, tmp_path):
    out = tmp_path / "a.json"
    result = polytrain("bench", str(bench_job), "--steps", "3", "--warmup", "1", "--json", str(out))
    figures = json.loads(out.read_text())
    rows = [line.split("  ", 1) for line in result.stdout.splitlines()[1:] if "  " in line]
    table = {label.strip(): value.strip() for label, value in rows}
    assert table["tokens/s"] == f"{figures['tokens_per_s']:,.0f}"  # a short human table on stdout
    assert f"figures: {out}" in result.stdout
    assert figures["schema"] == "polytrain.bench/1" and figures["backend"] == "cpu" and figures["world_size"] == 1
    assert figures["steps"] == 3 and figures["step_time_s"]["n"] == 3
    timing = figures["step_time_s"]
    assert 0 < timing["min"] <= timing["median"] <= timing["max"]
    assert figures["tokens_per_step"] > 8  # 8 conversations of several tokens each
    assert figures["tokens_per_s"] == pytest.approx(figures["tokens_per_step"] / timing["median"])
    assert 0 < figures["mfu"] < 1 and figures["peak_flops_per_s"] > 1e9
    assert figures["peak_host_memory_bytes"] > 10 * 2**20
    assert "step 4/4" in result.stderr  # progress: 1 warm-up + 3 timed
    assert not (bench_job.parent / "must-not-exist").exists()

    polytrain("bench", str(bench_job), "--steps", "2", "--warmup", "0", "--peak-flops", "1e12",
              "--json", str(tmp_path / "b.json"))
    figures_b = json.loads((tmp_path / "b.json").read_text())
    assert figures_b["peak_flops_per_s"] == 1e12 and figures_b["mfu"] == pytest.approx(
        figures_b["achieved_flops_per_s"] / 1e12)

    table = polytrain("bench", "--compare", str(out), str(tmp_path / "b.json")).stdout
    assert "tokens/s" in table and "MFU (%)" in table and "b / a" in table
    row = next(line for line in table.splitlines() if line.startswith("peak TFLOP/s"))
    assert row.split()[-1] == f"x{1e12 / figures['peak_flops_per_s']:.2f}"


def test_bench_bad_input_is_one_line(bench_job, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"tokens_per_s": 1}')
    result = polytrain("bench", "--compare", str(bad), str(bad), check=False)
    assert result.returncode == 2 and "bad.json: not a `polytrain bench --json` result" in result.stderr
    assert "Traceback" not in result.stderr
    result = polytrain("bench", str(bench_job), "--steps", "1", check=False)
    assert result.returncode == 2 and "--steps must be >= 2" in result.stderr
    result = polytrain("bench", check=False)
    assert result.returncode == 2 and "give a job config" in result.stderr


@pytest.mark.parametrize("measured", [(2e11, 3e11), (3e11, 2e11)], ids=["faster-after", "faster-before"])
def test_mfu_is_taken_against_the_higher_of_the_peaks_measured_around_the_steps(bench_job, monkeypatch, measured):
    from polytrain.bench import runner
    from polytrain.config import load_config

    peaks = iter(measured)  # a third measurement would raise StopIteration
    monkeypatch.setattr(runner, "matmul_peak", lambda backend, dtype: next(peaks))
    figures = runner.bench_job(load_config(bench_job, []), 2, 0)
    assert figures["peak_flops_per_s"] == 3e11
    assert figures["mfu"] == pytest.approx(figures["achieved_flops_per_s"] / 3e11)
