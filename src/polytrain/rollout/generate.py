"""Batched autoregressive sampling with a KV cache: greedy, temperature and nucleus (top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.models.transformer import CausalLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int = 0


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of `logits` [B, V]."""
    if cfg.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= cfg.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CausalLM, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int], pad_id: int = 0
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). Prompts are left-padded into one batch."""
    if not model.supports_kv_cache:
        return _generate_without_cache(model, prompts, cfg, stop_ids, pad_id)
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(batch, longest, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):
        input_ids[i, longest - len(prompt) :] = torch.tensor(prompt, device=device)
        valid[i, longest - len(prompt) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    cache = model.new_cache(batch, longest + cfg.max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None

    was_training = model.training
    model.eval()
    logits = model(input_ids, position_ids=positions, cache=cache, valid=valid)[:, -1]
    next_pos = positions[:, -1] + 1
    outputs: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator)
        for i in range(batch):
            if not done[i]:
                if int(token[i]) in stop_ids:
                    done[i] = True
                else:
                    outputs[i].append(int(token[i]))
        if bool(done.all()):
            break
        logits = model(token[:, None], position_ids=next_pos[:, None], cache=cache, valid=~done[:, None])[:, -1]
        next_pos = next_pos + 1
    model.train(was_training)
    return outputs


@torch.no_grad()
def _generate_without_cache(
    model: CausalLM, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: set[int], pad_id: int
) -> list[list[int]]:
    """Recompute the whole sequence for every new token (models without a KV cache, e.g. DeepSeek-V4 here).
    Rows are right-padded, so padding never precedes a real token and causal attention ignores it."""
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    sequences = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
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
        for i in range(len(sequences)):
            if done[i]:
                continue
            value = int(token[i])
            if value in stop_ids:
                done[i] = True
            else:
                outputs[i].append(value)
                sequences[i].append(value)
        if all(done):
            break
    model.train(was_training)
    return outputs
