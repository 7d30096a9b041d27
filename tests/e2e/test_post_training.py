"""Post-training end to end on the shipped data: GRPO raises reward, distillation lowers the reverse KL to the
teacher, DPO and the reward model learn the held-out preferences; bad input is reported clearly.

Two SFT runs are the starting points: a brief one (120 steps: counts letters right ~29% of the time) and a longer
one (300 steps: the teacher, ~92% on counting)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import EXAMPLES
from tests.e2e.test_cli import final_weights, polytrain


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("post")
    runs = {}
    for name, steps in (("student", 120), ("teacher", 300)):
        runs[name] = root / name
        polytrain("sft", str(EXAMPLES / "sft_tiny.toml"), "--set", f"train.steps={steps}", "--set", "eval.every=0",
                  "--set", f'run.output_dir="{runs[name]}"', "--set", "checkpoint.keep_last=1")
    runs["root"] = root
    return runs


@pytest.mark.timeout(600)  # the first test of the module: its time limit covers the two SFT runs of `sft` too
def test_grpo_raises_reward_on_a_verifiable_task(sft):
    run = sft["root"] / "grpo"
    stderr = polytrain("grpo", str(EXAMPLES / "grpo_tiny.toml"), "--set", f'init.from_run="{sft["student"]}"',
                       "--set", f'run.output_dir="{run}"').stderr
    # the console leads with GRPO's own numbers
    step_lines = [line for line in stderr.splitlines() if line.startswith("step ") and " | reward " in line]
    assert step_lines and all(" reward std " in line and " response len " in line and " clip " in line
                              for line in step_lines), stderr[-2000:]
    rollouts = [m["reward"] for m in metrics(run) if "reward" in m]
    first, last = sum(rollouts[:10]) / 10, sum(rollouts[-10:]) / 10
    result = summary(run)
    # measured: sampled reward 0.20 -> 0.59 (mean of the first / last 10 rollouts), greedy eval 0.29 -> 1.0; a
    # flipped advantage sign drives the reward to 0 and a zero gradient leaves it where it started
    assert last > first + 0.2, rollouts
    assert result["eval_exact_last"] > result["eval_exact_first"] + 0.3, result


def test_distillation_lowers_reverse_kl_to_the_teacher(sft):
    run = sft["root"] / "distill"
    polytrain("distill", str(EXAMPLES / "distill_tiny.toml"), "--set", f'init.from_run="{sft["student"]}"',
              "--set", f'distill.teachers=["{sft["teacher"]}"]', "--set", f'run.output_dir="{run}"',
              "--set", "train.steps=40")
    result = summary(run)
    assert result["eval_reverse_kl_last"] < 0.5 * result["eval_reverse_kl_first"], result


def test_dpo_learns_held_out_preferences(sft):
    run = sft["root"] / "dpo"
    stderr = polytrain("dpo", str(EXAMPLES / "dpo_tiny.toml"), "--set", f'init.from_run="{sft["teacher"]}"',
                       "--set", f'run.output_dir="{run}"', "--set", "train.steps=60", "--set", "eval.every=30").stderr
    assert any(line.startswith("step 60/60") and "| loss " in line and ", margin " in line and ", accuracy " in line
               for line in stderr.splitlines()), stderr[-2000:]
    result = summary(run)
    # at step 0 policy = reference: every margin is 0 (accuracy 0, loss log 2)
    assert result["eval_loss_first"] == pytest.approx(0.6931, abs=1e-3)
    assert result["eval_accuracy_last"] > 0.7 and result["eval_loss_last"] < 0.6, result


def test_reward_model_learns_held_out_preferences(sft):
    run = sft["root"] / "rm"
    polytrain("rm", str(EXAMPLES / "rm_tiny.toml"), "--set", f'init.from_run="{sft["teacher"]}"',
              "--set", f'run.output_dir="{run}"', "--set", "train.steps=100", "--set", "eval.every=50")
    result = summary(run)
    # measured: accuracy 0.27 -> 0.85, loss 0.71 -> 0.25 in 100 steps (0.84, 0.24 in the example's 200)
    assert result["eval_accuracy_last"] > result["eval_accuracy_first"] + 0.08, result
    assert result["eval_loss_last"] < 0.6 * result["eval_loss_first"], result
    generated = polytrain("generate", str(run), "--prompt", "hi", "--max-new-tokens", "2")
    assert "is a reward-model run" in generated.stderr


def test_external_rollout_engine_gets_every_weight_update(sft, tmp_path):
    run, out = tmp_path / "engine", tmp_path / "engine_weights.pt"
    polytrain("grpo", str(EXAMPLES / "grpo_tiny.toml"), "--set", f'init.from_run="{sft["student"]}"',
              "--set", f'run.output_dir="{run}"', "--set", 'grpo.engine="tests.e2e.fake_engine:FakeEngine"',
              "--set", "grpo.sync_bucket_mb=4", "--set", 'grpo.mismatch_correction="token-tis"',
              "--set", "train.steps=4", "--set", "eval.every=0", "--set", "checkpoint.every=0",
              env={"FAKE_ENGINE_OUT": str(out)})
    received = torch.load(out, weights_only=True)
    assert received["updates"] == 1 + 4  # the starting weights, then after every optimizer step
    trained = final_weights(run)
    for name, tensor in trained.items():
        assert torch.equal(received["state"][name], tensor), name
    assert any(".experts.0." in n for n in received["hf_names"])  # Hugging Face layout: one tensor per expert
    assert 0 < received["largest_bucket"] <= 4 * 2**20  # grpo.sync_bucket_mb
    steps = [m for m in metrics(run) if m.get("step", 0) > 0 and "loss" in m]
    assert len(steps) == 4 and all("reward" in m for m in steps)
    # the engine holds the policy's own weights: its log-probs match the trainer's up to rounding, nothing capped
    assert all(abs(m["mismatch_kl"]) < 1e-6 and m["tis_capped"] == 0 for m in steps)


def test_reward_failures_are_logged_with_the_sample_or_stop_the_run(sft, tmp_path):
    common = ["--set", f'init.from_run="{sft["student"]}"', "--set", "train.steps=2", "--set", "eval.every=0",
              "--set", 'grpo.rewards=["exact_match", "tests.unit.test_rollout:raising"]']
    run = tmp_path / "zero"
    result = polytrain("grpo", str(EXAMPLES / "grpo_tiny.toml"), *common, "--set", f'run.output_dir="{run}"')
    assert "reward `tests.unit.test_rollout:raising` failed at step 1 (ZeroDivisionError" in result.stderr
    errors = [json.loads(line) for line in (run / "reward_errors.jsonl").read_text().splitlines()]
    assert len(errors) == 2 * 16 * 8 and errors[0]["prompt"].startswith("How many letters are in")
    assert summary(run)["steps"] == 2

    stop = polytrain("grpo", str(EXAMPLES / "grpo_tiny.toml"), *common, "--set", f'run.output_dir="{tmp_path / "s"}"',
                     "--set", 'grpo.on_reward_error="stop"', check=False)
    assert stop.returncode != 0
    assert 'reward evaluation(s) failed and grpo.on_reward_error = "stop"' in stop.stderr
    assert "Traceback" not in stop.stderr


def test_teacher_with_another_tokenizer_is_refused(sft, tmp_path):
    tokenizer = json.loads((EXAMPLES / "tokenizer" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    (tmp_path / "other.json").write_text(json.dumps(tokenizer))
    teacher = tmp_path / "teacher"
    polytrain("sft", str(EXAMPLES / "sft_tiny.toml"), "--set", "train.steps=1", "--set", "eval.every=0",
              "--set", f'data.tokenizer="{tmp_path / "other.json"}"', "--set", f'run.output_dir="{teacher}"')
    result = polytrain("distill", str(EXAMPLES / "distill_tiny.toml"), "--set", f'init.from_run="{sft["student"]}"',
                       "--set", f'distill.teachers=["{teacher}"]', "--set", f'run.output_dir="{tmp_path / "d"}"',
                       check=False)
    assert result.returncode == 2
    assert "whose vocabulary differs from the student's" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("overrides", "message"), [
    (["grpo.group_size=3", "train.micro_batch_size=32"], "must split into 1 minibatch(es) of whole micro-batches"),
    (["grpo.minibatches=2", "train.steps=5"], "must be multiples of 2"),
    (["grpo.max_new_tokens=63"], "leaves no room for a prompt"),
    (["grpo.reward_weights=[1.0, 2.0]"], "grpo.reward_weights has 2 entries for 1 reward functions"),
    (['grpo.rewards=["nope"]'], "unknown reward `nope`"),
])
def test_bad_grpo_settings_are_one_clear_line(sft, tmp_path, overrides, message):
    args = [x for o in overrides for x in ("--set", o)]
    result = polytrain("grpo", str(EXAMPLES / "grpo_tiny.toml"), "--set", f'init.from_run="{sft["student"]}"',
                       "--set", f'run.output_dir="{tmp_path / "r"}"', *args, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_grpo_stops_only_between_rollouts_and_resumes_exactly(sft, tmp_path):
    """With 2 minibatches a rollout feeds 2 steps: --stop-at-step 1 stops after step 2; resuming reproduces the
    uninterrupted run's losses. The rollouts come from an external engine (tests/e2e/fake_engine.py), which holds
    weights of its own: a resumed run must sync it with the restored policy before it samples."""
    common = ["--set", f'init.from_run="{sft["student"]}"', "--set", "grpo.minibatches=2", "--set", "train.steps=4",
              "--set", "checkpoint.every=0", "--set", "eval.every=0",
              "--set", 'grpo.engine="tests.e2e.fake_engine:FakeEngine"']
    env = {"FAKE_ENGINE_OUT": str(tmp_path / "engine.pt")}
    config = str(EXAMPLES / "grpo_tiny.toml")
    whole, split = tmp_path / "whole", tmp_path / "split"
    polytrain("grpo", config, *common, "--set", f'run.output_dir="{whole}"', env=env)
    stopped = polytrain("grpo", config, *common, "--set", f'run.output_dir="{split}"', "--stop-at-step", "1", env=env)
    assert "stopped after step 2" in stopped.stderr
    polytrain("grpo", config, *common, "--set", f'run.output_dir="{split}"', "--resume", env=env)
    losses = [[m["loss"] for m in metrics(run) if "loss" in m] for run in (whole, split)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_precomputed_reference_gives_the_reference_model_losses(sft, tmp_path):
    """`--precompute-reference` writes the starting model's log-probs into the data; training on that file with
    dpo.reference = "precomputed" matches training against the frozen reference model."""
    lines = (EXAMPLES / "data" / "pref_train.jsonl").read_text().splitlines()[:32]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    common = ["--set", f'init.from_run="{sft["teacher"]}"', "--set", f'data.train_path="{tmp_path / "pairs.jsonl"}"',
              "--set", "train.steps=3", "--set", "eval.every=0", "--set", 'data.eval_path=""']
    config = str(EXAMPLES / "dpo_tiny.toml")
    out = tmp_path / "with_ref.jsonl"
    polytrain("dpo", config, *common, "--set", f'run.output_dir="{tmp_path / "pre"}"', "--precompute-reference",
              str(out))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 32 and all(r["ref_chosen_logp"] < 0 and r["ref_rejected_logp"] < 0 for r in records)
    polytrain("dpo", config, *common, "--set", f'run.output_dir="{tmp_path / "model"}"')
    polytrain("dpo", config, *common, "--set", f'run.output_dir="{tmp_path / "stored"}"',
              "--set", f'data.train_path="{out}"', "--set", 'dpo.reference="precomputed"')
    by_model, stored = (metrics(tmp_path / name) for name in ("model", "stored"))
    losses = [[m["loss"] for m in run if "loss" in m] for run in (by_model, stored)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)

    missing = polytrain("dpo", config, *common, "--set", f'run.output_dir="{tmp_path / "missing"}"',
                        "--set", 'dpo.reference="precomputed"', check=False)
    assert missing.returncode == 2 and "lack ref_chosen_logp / ref_rejected_logp (first: pair 1)" in missing.stderr
    # held-out pairs need their reference log-probs too (before, evaluation crashed with a traceback)
    no_eval_ref = polytrain("dpo", config, *common, "--set", f'run.output_dir="{tmp_path / "eval"}"',
                            "--set", f'data.train_path="{out}"', "--set", 'dpo.reference="precomputed"',
                            "--set", f'data.eval_path="{EXAMPLES / "data" / "pref_eval.jsonl"}"', check=False)
    assert no_eval_ref.returncode == 2 and "pref_eval.jsonl lack ref_chosen_logp" in no_eval_ref.stderr
    assert "Traceback" not in no_eval_ref.stderr
