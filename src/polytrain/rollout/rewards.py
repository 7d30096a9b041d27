"""Reward functions: plain callables f(completion, answer, prompt, finished) -> float.

Built in (verifiable, rule-based): exact_match (the reply equals the reference answer, whitespace-trimmed),
similarity (1 - normalised edit distance to the answer: partial credit), clean_stop (1 if the reply ended with the
end-of-turn token rather than running out of length). Anything else is named 'module:function' and imported.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from polytrain.errors import ConfigError, closest

RewardFn = Callable[..., float]


def exact_match(completion: str, answer: str | None, prompt: str = "", finished: bool = True) -> float:
    return float(answer is not None and completion.strip() == str(answer).strip())


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(completion: str, answer: str | None, prompt: str = "", finished: bool = True) -> float:
    if answer is None:
        return 0.0
    a, b = completion.strip(), str(answer).strip()
    return 1.0 - edit_distance(a, b) / max(len(a), len(b), 1)


def clean_stop(completion: str, answer: str | None = None, prompt: str = "", finished: bool = True) -> float:
    return float(finished)


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "similarity": similarity, "clean_stop": clean_stop}


def resolve(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ConfigError(f"unknown reward `{name}`{closest(name, BUILTIN)}; built in: {', '.join(BUILTIN)}, or "
                          "'module:function'")
    module_name, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward `{name}` cannot be imported ({err})") from None
    if not callable(fn):
        raise ConfigError(f"reward `{name}` is not callable")
    return fn


@dataclass
class RewardFailure:
    reward: str
    error: str
    prompt: str
    completion: str


class Rewards:
    """The weighted sum of the configured reward functions, with failures caught per sample."""

    def __init__(self, names: list[str], weights: list[float]) -> None:
        self.names = list(names)
        self.fns = [resolve(n) for n in names]
        self.weights = list(weights) or [1.0] * len(names)

    def score(self, completion: str, answer: str | None, prompt: str,
              finished: bool) -> tuple[float, list[RewardFailure]]:
        total, failures = 0.0, []
        for name, fn, weight in zip(self.names, self.fns, self.weights):
            try:
                value = float(fn(completion, answer, prompt, finished))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}")
            except Exception as err:
                failures.append(RewardFailure(name, f"{type(err).__name__}: {err}", prompt, completion))
                continue
            total += weight * value
        return total, failures
