"""Batched autoregressive sampling with a KV cache: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from polytrain.models.common.decoder import DecoderLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int = 0


Generators = torch.Generator | list[torch.Generator] | None


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Generators) -> torch.Tensor:
    """Next token per row of `logits` [B, V]. With one generator per row, each row draws its own uniform and
    inverts its CDF, so a row's sample does not depend on which other rows share the batch (rollouts are then
    the same for any data-parallel layout or batch split)."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if isinstance(generator, list):
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(probs.device)
        cdf = probs.cumsum(dim=-1)
        token = (cdf < (u * cdf[:, -1]).unsqueeze(-1)).sum(dim=-1)
        return token.clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generators(cfg: SamplingConfig, device: torch.device, row_seeds: list[int] | None) -> Generators:
    if cfg.temperature <= 0:
        return None
    if row_seeds is not None:
        return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]
    return torch.Generator(device=device).manual_seed(cfg.seed)


KeepGoing = Callable[[bool], bool]
"""Given whether this process still has unfinished rows, whether to run another decoding step. Data-parallel
sharded models pass an all-ranks 'any' so every rank runs the same number of forwards (their collectives pair up)."""


def alone(any_left: bool) -> bool:
    """The KeepGoing of a single process."""
    return any_left


@torch.no_grad()
def sample(
    model: DecoderLM, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int], pad_id: int = 0,
    keep_going: KeepGoing = alone, row_seeds: list[int] | None = None, logprobs: list[list[float]] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """(new tokens per prompt with the stop token included when one was sampled, whether each row stopped).
    Prompts are left-padded into one batch; finished rows keep decoding padding until every row is done.
    `row_seeds`: one sampling seed per row (layout-independent sampling) instead of `cfg.seed` for the batch.
    `logprobs`: an empty list to receive, per row, the log-probability of each sampled token under the model
    (before temperature and top-p, as the trainer computes it)."""
    if not model.supports_kv_cache:
        return _sample_without_cache(model, prompts, cfg, stop_ids, pad_id, keep_going, row_seeds, logprobs)
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        valid[i, longest - len(prompt) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = model.new_cache(batch, longest + cfg.max_new_tokens)
    generator = generators(cfg, device, row_seeds)

    was_training = model.training
    model.eval()
    logits = model(input_ids, position_ids=positions, cache=cache, valid=valid)[:, -1]
    next_pos = positions[:, -1] + 1
    outputs: list[list[int]] = [[] for _ in range(batch)]
    record = _Recorder(logprobs, batch)
    done = [False] * batch
    for step in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator)
        chosen = record.of(logits, token)
        for i, value in enumerate(token.tolist()):
            if not done[i]:
                outputs[i].append(value)
                record.add(i, chosen)
                done[i] = value in stop_ids
        if step == cfg.max_new_tokens - 1 or not keep_going(not all(done)):
            break
        alive = torch.tensor([not d for d in done], device=device)
        logits = model(token[:, None], position_ids=next_pos[:, None], cache=cache, valid=alive[:, None])[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    return outputs, done


class _Recorder:
    """Collects the log-probability of each sampled token, row by row (a no-op without a list to fill)."""

    def __init__(self, out: list[list[float]] | None, rows: int) -> None:
        self.out = out
        if out is not None:
            out[:] = [[] for _ in range(rows)]

    def of(self, logits: torch.Tensor, token: torch.Tensor) -> list[float] | None:
        if self.out is None:
            return None
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1).tolist()

    def add(self, row: int, chosen: list[float] | None) -> None:
        if self.out is not None and chosen is not None:
            self.out[row].append(chosen[row])


@torch.no_grad()
def generate(
    model: DecoderLM, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int], pad_id: int = 0
) -> list[list[int]]:
    """New tokens for each prompt, the stop token excluded."""
    tokens, finished = sample(model, prompts, cfg, stop_ids, pad_id)
    return [t[:-1] if f else t for t, f in zip(tokens, finished)]


@torch.no_grad()
def _sample_without_cache(
    model: DecoderLM, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int], pad_id: int,
    keep_going: KeepGoing, row_seeds: list[int] | None, logprobs: list[list[float]] | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Recompute the whole sequence for every new token (models without a KV cache; for those with one, the
    oracle their cached decoding is tested against).
    Rows are right-padded, so padding never precedes a real token and causal attention ignores it."""
    device = model.embed_tokens.weight.device
    generator = generators(cfg, device, row_seeds)
    sequences = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    record = _Recorder(logprobs, len(prompts))
    done = [False] * len(prompts)
    was_training = model.training
    model.eval()
    for _ in range(cfg.max_new_tokens):
        width = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
        for i, seq in enumerate(sequences):
            batch[i, : len(seq)] = torch.tensor(seq, device=device)
        last = torch.tensor([len(s) - 1 for s in sequences], device=device)
        logits = model(batch)[torch.arange(len(sequences), device=device), last]
        token = sample_next(logits, cfg, generator)
        chosen = record.of(logits, token)
        for i, value in enumerate(token.tolist()):
            if not done[i]:
                outputs[i].append(value)
                record.add(i, chosen)
                sequences[i].append(value)
                done[i] = value in stop_ids
        if not keep_going(not all(done)):
            break
    model.train(was_training)
    return outputs, done
