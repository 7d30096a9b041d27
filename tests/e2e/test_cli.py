"""The CLI as a user runs it: train, get interrupted, resume exactly, generate, plot; bad input exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES, ROOT, TOKENIZER

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def polytrain(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "polytrain", *args], capture_output=True, text=True, cwd=ROOT,
                            env={**ENV, **(env or {})}, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"polytrain {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A small job on a slice of the shipped data."""
    root = tmp_path_factory.mktemp("job")
    lines = (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (root / "eval.jsonl").write_text("\n".join((EXAMPLES / "data" / "eval.jsonl").read_text().splitlines()[:16]) + "\n")
    (root / "job.toml").write_text(f"""
[run]
output_dir = "{root / 'run'}"
[model]
preset = "tiny"
num_hidden_layers = 2
[data]
train_path = "train.jsonl"
eval_path = "eval.jsonl"
tokenizer = "{TOKENIZER}"
max_seq_len = 64
[train]
steps = 8
global_batch_size = 8
micro_batch_size = 4
warmup_steps = 2
[eval]
every = 4
[checkpoint]
every = 4
""")
    return root / "job.toml"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from polytrain.config import build_config, read_toml
    from polytrain.models import build_model
    from polytrain.train.checkpoint import latest_checkpoint, load_checkpoint

    config = build_config(read_toml(run_dir / "config.toml"))
    model = build_model(config.model, "cpu")
    load_checkpoint(latest_checkpoint(run_dir / "checkpoints"), model)
    return model.state_dict()


def test_train_writes_a_complete_run_directory(job):
    stderr = polytrain("sft", str(job), "--overwrite", "--set", "log.print_every=4").stderr
    # no terminal: full-width progress lines on the first step, every log.print_every steps and the last
    lines = [line for line in stderr.splitlines() if line.startswith("step ") and "/8 (" in line]
    assert [line.split()[1] for line in lines] == ["1/8", "4/8", "8/8"], stderr
    for line in lines:
        for part in ("| loss ", "| lr ", "| grad norm ", " tok/s |", "| mem ", " GiB host", "| elapsed "):
            assert part in line, (part, line)
        assert len(line) > 100  # never wrapped at 80 columns
    assert "ETA" in lines[1] and "ETA" not in lines[-1]
    run_dir = job.parent / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["eval_loss_last"] < summary["eval_loss_first"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 9))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_host_mem_gib"):
        assert key in records[1], key
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert any((run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]


def start_30_steps(job: Path, run: Path, env: dict[str, str]) -> tuple[list[str], subprocess.Popen]:
    """(the command, its process) of a 30-step run without periodic checkpoints, once its first step is logged."""
    cmd = [sys.executable, "-m", "polytrain", "sft", str(job), "--set", f'run.output_dir="{run}"',
           "--set", "train.steps=30", "--set", "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            break
        time.sleep(0.05)
    return cmd, proc


def test_interrupted_then_resumed_run_equals_uninterrupted_run(job, tmp_path):
    straight = tmp_path / "straight"
    polytrain("sft", str(job), "--set", f'run.output_dir="{straight}"', "--set", "train.steps=30",
              "--set", "checkpoint.every=0")

    broken = tmp_path / "broken"
    cmd, proc = start_30_steps(job, broken, ENV)
    metrics = broken / "metrics.jsonl"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "SIGINT: stopped after step" in stderr and "Traceback" not in stderr
    saved = json.loads(next((broken / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())["step"]
    assert 1 <= saved < 30

    resumed = polytrain(*cmd[3:], "--resume")
    assert "resumed from" in resumed.stderr
    a, b = final_weights(straight), final_weights(broken)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 31))  # one record per step, none lost or repeated


def test_generate_and_plot(job):
    run_dir = job.parent / "run"
    if not (run_dir / "summary.json").exists():
        polytrain("sft", str(job), "--overwrite")
    out = polytrain("generate", str(run_dir), "--prompt", "Say twice: abc", "--prompt", "Reverse: xyz",
                    "--max-new-tokens", "8", "--json")
    answers = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["prompt"] for a in answers] == ["Say twice: abc", "Reverse: xyz"]
    assert all(isinstance(a["answer"], str) and a["step"] == 8 for a in answers)
    sampled = polytrain("generate", str(run_dir), "--prompt", "Say twice: abc", "--temperature", "1.0",
                        "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "8")
    assert sampled.stdout.startswith("> Say twice: abc\n")
    png = run_dir / "replot.png"
    polytrain("plot", str(run_dir), "--out", str(png))
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.lerning_rate=1"], "unknown config key `train.lerning_rate` in [train]"),
        (["--set", "train.steps=-1"], "`train.steps` must be >= 1"),
        (["--set", 'data.train_path="missing.jsonl"'], "data file not found: missing.jsonl"),
        (["--set", 'data.tokenizer="nope.json"'], "tokenizer file not found"),
    ],
)
def test_bad_input_is_one_clear_line(job, extra, message):
    result = polytrain("sft", str(job), "--overwrite", *extra, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_existing_run_is_not_overwritten_without_a_flag(job):
    run_dir = job.parent / "run"
    if not (run_dir / "config.toml").exists():
        polytrain("sft", str(job), "--overwrite")
    before = (run_dir / "metrics.jsonl").read_text()
    result = polytrain("sft", str(job), check=False)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_malformed_data_names_file_and_line(job, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    result = polytrain("sft", str(job), "--overwrite", "--set", f'data.train_path="{bad}"', check=False)
    assert result.returncode == 2
    assert f"{bad}:2: invalid JSON" in result.stderr


def test_help_teaches():
    assert "polytrain sft examples/sft_tiny.toml" in polytrain("sft", "--help").stdout
    reference = polytrain("sft", "--help-config").stdout
    for key in ("train.lr", "data.packing", "checkpoint.keep_last", "model.hidden_size"):
        assert key in reference
    assert "grpo." not in reference and "dpo.beta" not in reference and "--help-config --all" in reference
    everything = polytrain("sft", "--help-config", "--all").stdout
    for key in ("model.n_group", "grpo.group_size", "dpo.beta"):
        assert key in everything
    assert "grpo.group_size" in polytrain("grpo", "--help-config").stdout


def test_shipped_example_data_is_what_the_generator_makes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_example_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, cwd=ROOT)
    for name in ("data/train.jsonl", "data/eval.jsonl", "data/pref_train.jsonl", "data/pref_eval.jsonl",
                 "data/count_train.jsonl", "data/count_eval.jsonl",
                 "tokenizer/tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


def test_resume_refuses_what_it_cannot_continue_and_resume_or_start_starts(job, tmp_path):
    missing = tmp_path / "typo"
    refused = polytrain("sft", str(job), "--set", f'run.output_dir="{missing}"', "--resume", check=False)
    assert refused.returncode == 2 and not missing.exists()
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: --resume: {missing} holds no polytrain run")

    run = tmp_path / "run"
    common = ["--set", f'run.output_dir="{run}"', "--set", "train.steps=2"]
    polytrain("sft", str(job), *common)
    for checkpoint in (run / "checkpoints").iterdir():  # every checkpoint damaged
        (checkpoint / "manifest.json").unlink()
    before = (run / "metrics.jsonl").read_text()
    refused = polytrain("sft", str(job), *common, "--resume", check=False)
    assert refused.returncode == 2 and "error: --resume: no usable checkpoint" in refused.stderr
    assert (run / "metrics.jsonl").read_text() == before  # nothing was changed

    fresh = tmp_path / "fresh"
    polytrain("sft", str(job), "--set", f'run.output_dir="{fresh}"', "--set", "train.steps=2", "--resume-or-start")
    again = polytrain("sft", str(job), "--set", f'run.output_dir="{fresh}"', "--set", "train.steps=3",
                      "--resume-or-start")
    assert "resumed from" in again.stderr


def test_a_second_ctrl_c_during_the_checkpoint_does_not_lose_it(job, tmp_path):
    """Two real SIGINTs: the first asks to stop; the second arrives while the checkpoint is written (slowed down by
    an injected fault) and must not cut it short."""
    run = tmp_path / "run"
    env = {**ENV, "POLYTRAIN_FAULTS": ",".join(f"slow_save@{step}:seconds=3" for step in range(1, 31))}
    cmd, proc = start_30_steps(job, run, env)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while time.time() < deadline and not list((run / "checkpoints").glob("*.tmp")):  # the save has begun
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "it finishes first" in stderr and "saved a checkpoint" in stderr and "FAILED" not in stderr
    resumed = polytrain(*cmd[3:], "--resume", "--set", "train.steps=31")
    assert "resumed from" in resumed.stderr
