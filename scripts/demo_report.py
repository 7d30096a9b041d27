"""After `polytrain sft examples/sft_tiny.toml`: answer held-out prompts and score them per task.

Usage: python scripts/demo_report.py RUN_DIR [--n 60] [--show 9]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from polytrain.rollout.generate import SamplingConfig
from polytrain.train.chat import RunChat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--eval-file", default="examples/data/eval.jsonl")
    parser.add_argument("--n", type=int, default=200, help="held-out prompts to score")
    parser.add_argument("--show", type=int, default=9, help="generations to print")
    args = parser.parse_args()

    records = [json.loads(line) for line in Path(args.eval_file).read_text().splitlines()[: args.n]]
    prompts = [r["messages"][0]["content"] for r in records]
    chat = RunChat(args.run_dir, device="auto")
    answers = chat.answer(prompts, SamplingConfig(max_new_tokens=32))
    right: dict[str, list[bool]] = defaultdict(list)
    print(f"Greedy answers of the step-{chat.step} model to held-out prompts:")
    for i, (record, answer) in enumerate(zip(records, answers)):
        expected = record["messages"][1]["content"]
        right[record["task"]].append(answer == expected)
        if i < args.show:
            mark = "ok " if answer == expected else "WRONG"
            print(f"  [{mark}] {record['messages'][0]['content']!r:34} -> {answer!r}" +
                  ("" if answer == expected else f"  (expected {expected!r})"))
    scores = ", ".join(f"{task} {sum(v)}/{len(v)}" for task, v in sorted(right.items()))
    total = sum(sum(v) for v in right.values())
    print(f"Exact-match accuracy on {len(records)} held-out prompts: {total}/{len(records)} ({scores})")


if __name__ == "__main__":
    main()
