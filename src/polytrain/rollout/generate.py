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
