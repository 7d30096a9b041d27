"""Write long counting conversations (12K-16K tokens each with the example tokenizer) for long-context runs.

    python examples/data/make_long.py runs/long.jsonl --rows 64

User: "Count from 1 to N." Assistant: "1 2 3 ... N", N drawn from 2,600-3,400 (seeded), so every conversation is one
document of 12,000-16,000 tokens: a row of `examples/long_context.toml` (max_seq_len 16,384) holds one.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSONL file to write")
    parser.add_argument("--rows", type=int, default=64, help="conversations (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for _ in range(args.rows):
            n = rng.randint(2600, 3400)
            messages = [{"role": "user", "content": f"Count from 1 to {n}."},
                        {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]
            f.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {args.rows} conversations to {args.out}")


if __name__ == "__main__":
    main()
