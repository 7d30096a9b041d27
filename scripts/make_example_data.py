"""Generate the shipped example data: a character-level tokenizer and chat datasets a tiny model can learn.

Four instructions over random lowercase "words" (so every held-out prompt is new to the model, and each answer is
checkable, which lets `make demo` score the generations):
  count    "How many letters are in kqzt?"  -> "4"
  repeat   "Say twice: kqzt"                -> "kqzt kqzt"
  upper    "Uppercase: kqzt"                -> "KQZT"
  reverse  "Reverse: kqzt"                  -> "tzqk"

`python scripts/make_example_data.py` rewrites examples/data/{train,eval}.jsonl (conversations; GRPO and
distillation use their prompts and answers), examples/data/pref_{train,eval}.jsonl (preference pairs: the right
answer against a plausible wrong one), examples/data/count_{train,eval}.jsonl (the counting prompts as
{"prompt", "answer"} records: the verifiable task of the GRPO example) and examples/tokenizer/tokenizer.json.
The output is a pure function of the arguments; a test checks the shipped files match it.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TASKS = ("count", "repeat", "upper", "reverse")


def build_tokenizer() -> Tokenizer:
    """Printable ASCII characters, one token each, plus the chat-template special tokens (103 tokens)."""
    chars = [chr(i) for i in range(32, 127)]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.decoder = decoders.Fuse()
    return tokenizer


def make_task(rng: random.Random) -> tuple[str, str, str]:
    """(task name, user prompt, expected answer)."""
    kind = rng.choice(TASKS)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    if kind == "count":
        return kind, f"How many letters are in {word}?", str(len(word))
    if kind == "repeat":
        return kind, f"Say twice: {word}", f"{word} {word}"
    if kind == "upper":
        return kind, f"Uppercase: {word}", word.upper()
    return kind, f"Reverse: {word}", word[::-1]


def make_conversations(count: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """`count` conversations whose prompts are not in `exclude` (which then holds them too)."""
    out = []
    while len(out) < count:
        kind, prompt, answer = make_task(rng)
        if prompt in exclude:
            continue
        exclude.add(prompt)
        out.append({"task": kind, "messages": [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": answer}]})
    return out


def wrong_answer(kind: str, word: str, rng: random.Random) -> str:
    """A plausible but wrong reply: what the rejected side of a preference pair says."""
    if kind == "count":
        return str(len(word) + rng.choice([-1, 1, 2]))
    if kind == "repeat":
        return word if rng.random() < 0.5 else f"{word} {word[::-1]}"
    if kind == "upper":
        return word if rng.random() < 0.5 else word[: len(word) // 2].upper() + word[len(word) // 2 :]
    return word if rng.random() < 0.5 else word[1:] + word[0]


def preference_pairs(conversations: list[dict], rng: random.Random) -> list[dict]:
    """{"prompt", "chosen", "rejected"} from conversations: the right answer against a plausible wrong one."""
    pairs = []
    for record in conversations:
        prompt, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        word = prompt.rstrip("?").split()[-1]
        rejected = wrong_answer(record["task"], word, rng)
        if rejected != answer:
            pairs.append({"task": record["task"], "prompt": prompt, "chosen": answer, "rejected": rejected})
    return pairs


def prompt_answers(conversations: list[dict], task: str) -> list[dict]:
    return [{"prompt": c["messages"][0]["content"], "answer": c["messages"][1]["content"]}
            for c in conversations if c["task"] == task]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="examples", help="directory to write data/ and tokenizer/ into")
    parser.add_argument("--train", type=int, default=12000, help="training conversations")
    parser.add_argument("--eval", type=int, default=200, help="held-out conversations (prompts unseen in training)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    seen: set[str] = set()
    evaluation = make_conversations(args.eval, rng, seen)
    train = make_conversations(args.train, rng, seen)
    out = Path(args.out)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "eval.jsonl", evaluation)
    pair_rng = random.Random(args.seed + 1)  # a separate stream: the conversation files above stay unchanged
    write_jsonl(out / "data" / "pref_train.jsonl", preference_pairs(train[:4000], pair_rng))
    write_jsonl(out / "data" / "pref_eval.jsonl", preference_pairs(evaluation, pair_rng))
    for name, rows in (("count_train", train), ("count_eval", evaluation)):
        write_jsonl(out / "data" / f"{name}.jsonl", prompt_answers(rows, "count"))
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer" / "tokenizer.json"))
    print(f"wrote {len(train)} train and {len(evaluation)} eval conversations and the tokenizer under {out}/")


if __name__ == "__main__":
    main()
