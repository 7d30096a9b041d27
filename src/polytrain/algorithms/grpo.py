"""GRPO-family policy optimisation: group-relative advantages, the PPO clipped surrogate, KL to a reference,
and the loss-aggregation modes in which frameworks silently differ.

Notation (per completion token t of completion i): lp = log pi_theta, old = behaviour-policy log-prob (stored at
rollout time), ref = reference log-prob, m = completion mask, A_i = advantage of completion i.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from polytrain.errors import ConfigError, closest
from polytrain.schema import option

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "constant")


@dataclass
class GRPOConfig:
    preset: str = option("verl", "Defaults of a framework: verl, trl, dr_grpo, dapo (keys set here override).")
    group_size: int = option(4, "Completions sampled per prompt (G).", ge=2)
    epochs: int = option(1, "Passes of optimisation over each rollout batch (old log-probs stored at rollout).", ge=1)
    minibatches: int = option(1, "Optimizer steps per pass: train.global_batch_size prompts x G completions are "
                              "split into this many.", ge=1)
    max_new_tokens: int = option(32, "Longest completion.", ge=1)
    temperature: float = option(1.0, "Sampling temperature of rollouts.", gt=0)
    top_p: float = option(1.0, "Nucleus sampling mass of rollouts.", gt=0, le=1)
    stop: list[str] = option([], "Extra strings that end a completion (the chat template's end-of-turn always does).")
    rewards: list[str] = option(
        ["exact_match"], "Reward functions, summed: built-in names (exact_match, similarity, clean_stop) or "
        "'module:function' callables f(completion, answer, prompt, finished) -> float."
    )
    reward_weights: list[float] = option([], "One weight per reward function (default 1 each).")
    on_reward_error: Literal["zero", "stop"] = option(
        "zero", "A reward function that raises or returns NaN: score 0 and log the sample (zero), or stop the run."
    )
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Advantage = (r - group mean) / (std + eps) with the group's std (group), the batch's (batch), or "
        "no division (none: Dr. GRPO)."
    )
    advantage_eps: float = option(1e-6, "eps of the advantage normalisation (verl 1e-6, TRL 1e-4).", gt=0)
    clip_low: float = option(0.2, "PPO ratio clip below: 1 - clip_low.", ge=0)
    clip_high: float = option(0.2, "PPO ratio clip above: 1 + clip_high (DAPO: 0.28).", ge=0)
    dual_clip: float = option(0.0, "Dual-clip c for negative advantages (verl 3.0); 0 = off.", ge=0)
    kl_coef: float = option(0.0, "Coefficient of the KL-to-reference loss term (0: no reference model).", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1, d = lp - ref.")
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "constant"] = option(
        "token-mean", "token-mean: over every completion token of the step (verl default, TRL 'dapo'); "
        "seq-mean-token-mean: original GRPO; seq-mean-token-sum; constant: sum / (completions x max_new_tokens), "
        "Dr. GRPO."
    )
    routing_replay: bool = option(
        False, "MoE routing replay (R3): record the experts chosen while sampling and use them when computing the "
        "training log-probs, so trainer and sampler agree on the routing."
    )
    engine: str = option("builtin", "Rollout engine: builtin (the policy's KV-cache sampler), vllm (vLLM / "
                         "vllm-ascend in its own environment: `make vllm-env`), or 'module:Class' implementing "
                         "polytrain.rollout.engine.RolloutEngine.")
    vllm_python: str = option("", "engine = vllm, colocated: the Python of vLLM's environment that runs the server "
                              "(default: $POLYTRAIN_VLLM_PYTHON, else the repository's .venv-vllm).")
    vllm_address: str = option("", "engine = vllm, server mode: host:port of a running polytrain vLLM server "
                               "(secret in $POLYTRAIN_VLLM_AUTHKEY), or several, comma-separated, one per rank of "
                               "rollout_ranks; empty: start one next to each rank that hosts an engine.")
    rollout_ranks: list[int] = option(
        [], "External engines: the ranks that host one (start a colocated vLLM server, or connect to the server of "
        "vllm_address) and sample every rank's prompts; only they receive the weight sync. Empty: every rank hosts "
        "its own (colocated), or rank 0 alone when vllm_address names one server."
    )
    vllm_sync: Literal["reload", "restart"] = option(
        "reload", "engine = vllm, how weights reach the engine after a step: reload (each bucket loaded into the "
        "running engine) or restart (written as a Hugging Face directory, the engine restarted from it)."
    )
    vllm_dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "engine = vllm: the dtype it serves "
                                                                   "(and that weights are synced in).")
    vllm_sleep: bool = option(False, "engine = vllm, colocated: put the engine to sleep between rollouts so it "
                              "holds no memory while the trainer works (where vLLM supports sleep mode).")
    vllm_max_num_seqs: int = option(0, "engine = vllm: most sequences per engine step (0: vLLM's default).", ge=0)
    vllm_kv_cache_gib: float = option(0.0, "engine = vllm: KV-cache size in GiB (0: vLLM sizes it from "
                                      "vllm_memory_utilization).", ge=0)
    vllm_memory_utilization: float = option(0.0, "engine = vllm: fraction of the device's memory (on CPU: of host "
                                            "memory) the engine may take (0: vLLM's default, 0.92 on CPU).",
                                            ge=0, le=1)
    vllm_enforce_eager: bool = option(False, "engine = vllm: no graph compilation or capture (faster start, slower "
                                      "decoding).")
    sync_check_rows: int = option(
        4, "External engines: after every weight sync, score this many fixed sequences (the first train prompts "
        "and their answers) on the engine and with the trainer, and compare the log-probs (0: no check).", ge=0
    )
    sync_check_tolerance: float = option(
        0.02, "Largest mean |engine - trainer| log-prob gap a sync may leave. Above it a reload sync is redone by "
        "restarting the engine, and a restart that is still above it stops the run. Set it a few times above the "
        "gap of the first sync (a fresh engine: the engine's numerics against the trainer's).", gt=0
    )
    sampler_weights: Literal["auto", "gathered", "sharded"] = option(
        "auto", "Built-in sampler under FSDP: gathered all-gathers the weights once per rollout and keeps them for "
        "every decoding step (ranks then decode independently unless expert / tensor parallelism needs them "
        "together); sharded gathers layer by layer at every step (least memory); auto: gathered when the whole "
        "model fits in half the free memory."
    )
    sync_bucket_mb: int = option(
        1024, "Weight sync to an external engine: MiB per bucket (a training rank's extra memory during a sync; a "
        "tensor larger than this travels alone).", ge=1
    )
    mismatch_correction: Literal["none", "token-tis", "sequence-mask"] = option(
        "none", "Correct for the rollout engine sampling from a slightly different distribution than the trainer "
        "computes: token-tis weights each token's policy-gradient term by min(exp(old - engine), mismatch_cap) "
        "(truncated importance sampling); sequence-mask drops completions whose geometric-mean ratio "
        "exp(mean(old - engine)) is outside [mismatch_low, mismatch_high]. Needs an engine that reports log-probs."
    )
    mismatch_cap: float = option(2.0, "token-tis: the truncation C of the per-token weight.", gt=0)
    mismatch_low: float = option(0.5, "sequence-mask: lowest geometric-mean ratio kept.", ge=0)
    mismatch_high: float = option(2.0, "sequence-mask: highest geometric-mean ratio kept.", gt=0)

    def validate(self) -> None:
        if self.rollout_ranks and self.engine == "builtin":
            raise ConfigError("grpo.rollout_ranks needs an external engine (grpo.engine = \"vllm\" or "
                              "'module:Class'): the built-in sampler decodes with the policy itself on every rank")
        addresses = self.vllm_addresses()
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"grpo.vllm_address = \"{self.vllm_address}\" names a server twice (a server serves one "
                              "trainer rank)")
        if self.routing_replay and self.engine_ranks():
            raise ConfigError("grpo.routing_replay is not available with rollout ranks (grpo.rollout_ranks, or "
                              "grpo.vllm_address): the routing is recorded by the policy that samples")
        if (len(addresses) > 1 or self.rollout_ranks) and addresses and len(addresses) != len(self.rollout_ranks):
            raise ConfigError(f"grpo.vllm_address names {len(addresses)} server(s) for grpo.rollout_ranks = "
                              f"{self.rollout_ranks}: list one rank per server, in the same order (a server serves "
                              "one trainer rank)")
        if self.mismatch_low >= self.mismatch_high:
            raise ConfigError(f"grpo.mismatch_low = {self.mismatch_low} must be below grpo.mismatch_high = "
                              f"{self.mismatch_high}")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"grpo.reward_weights has {len(self.reward_weights)} entries for "
                              f"{len(self.rewards)} reward functions")

    def vllm_addresses(self) -> list[str]:
        return [a.strip() for a in self.vllm_address.split(",") if a.strip()]

    def engine_ranks(self) -> list[int]:
        """The ranks that host an engine for all ([]: every rank its own)."""
        if self.engine == "builtin":
            return []
        if self.rollout_ranks or not self.vllm_addresses():
            return list(self.rollout_ranks)
        return [0]


PRESETS: dict[str, dict[str, Any]] = {
    # verl core_algos / ppo_trainer.yaml defaults
    "verl": dict(scale_rewards="group", advantage_eps=1e-6, clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.0,
                 kl_estimator="k3", loss_aggregation="token-mean"),
    # TRL GRPOConfig defaults (loss_type "dapo" = token-mean over the accumulated batch, beta 0)
    "trl": dict(scale_rewards="group", advantage_eps=1e-4, clip_low=0.2, clip_high=0.2, dual_clip=0.0, kl_coef=0.0,
                kl_estimator="k3", loss_aggregation="token-mean"),
    # Dr. GRPO: no std normalisation, constant normaliser, no KL
    "dr_grpo": dict(scale_rewards="none", clip_low=0.2, clip_high=0.2, dual_clip=0.0, kl_coef=0.0,
                    loss_aggregation="constant"),
    # DAPO: clip-higher, token-mean, no KL
    "dapo": dict(scale_rewards="group", advantage_eps=1e-6, clip_low=0.2, clip_high=0.28, dual_clip=0.0,
                 kl_coef=0.0, loss_aggregation="token-mean"),
}


def grpo_table(table: dict[str, Any]) -> dict[str, Any]:
    """A `[grpo]` table with its preset's values filled in under the keys it sets itself."""
    preset = table.get("preset", "verl")
    if preset not in PRESETS:
        raise ConfigError(f"unknown grpo.preset `{preset}`{closest(preset, PRESETS)}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **table}


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    """Per-completion advantage: reward minus its group's mean, divided by the (Bessel) std of the group or of
    the whole batch, plus eps; `none` leaves the difference undivided. `rewards` holds whole groups in order."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.std() + eps)
    return centred.flatten()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled token; d is clamped to [-20, 20] and k3 to [-10, 10]
    (as verl and OpenRLHF) so one extreme token cannot produce inf."""
    d = (logp - ref_logp).clamp(-20, 20)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return (torch.exp(-d) + d - 1).clamp(-10, 10)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                      clip_high: float, dual_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token PPO loss, per-token indicator that clipping was active). advantages broadcast over tokens."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss, (clipped > unclipped).float()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, global_tokens: float, global_seqs: float,
              max_new_tokens: int, row_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """This micro-batch's share of the step's loss. per_token / mask: [completions, T]. Normalisers cover the whole
    optimizer step (all ranks and micro-batches), so the shares add up to exactly the global value. `row_tokens`:
    each completion's token count when the tensors hold only part of each row (context parallelism)."""
    masked = per_token * mask
    if mode == "token-mean":
        return masked.sum() / global_tokens
    if mode == "seq-mean-token-sum":
        return masked.sum() / global_seqs
    if mode == "seq-mean-token-mean":
        lengths = mask.sum(dim=1) if row_tokens is None else row_tokens
        return (masked.sum(dim=1) / lengths.clamp(min=1)).sum() / global_seqs
    return masked.sum() / (global_seqs * max_new_tokens)


def mismatch_correction(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                        cap: float, low: float, high: float,
                        row_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-token weight of the policy-gradient term, sums for the metrics) for the gap between the trainer's
    behaviour log-probs `old_logp` and the engine's `engine_logp` of the same sampled tokens ([completions, T];
    `mask` marks completion tokens).

    token-tis: w = min(exp(old - engine), cap). sequence-mask: w = 1 for completions whose geometric-mean ratio
    exp(mean over its tokens of (old - engine)) lies in [low, high], else 0. none: w = 1. The metrics are sums over
    the micro-batch: `mismatch_k3` of the k3 estimate of KL(engine || trainer) per token, r - 1 - log r with
    r = exp(old - engine); `capped_tokens` where token-tis truncated; `masked_sequences` dropped by sequence-mask.
    `row_sum` turns per-row partial sums into whole-row ones when the tensors hold part of each row."""
    log_ratio = ((old_logp - engine_logp) * mask).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    metrics = {"mismatch_k3": ((torch.expm1(log_ratio) - log_ratio) * mask).sum(),  # accurate for tiny gaps
               "capped_tokens": torch.zeros((), device=mask.device),
               "masked_sequences": torch.zeros((), device=mask.device)}
    if mode == "token-tis":
        metrics["capped_tokens"] = ((ratio > cap).float() * mask).sum()
        return ratio.clamp(max=cap), metrics
    if mode == "sequence-mask":
        whole = row_sum or (lambda per_row: per_row)
        tokens = whole(mask.sum(dim=1))
        geometric = torch.exp(whole(log_ratio.sum(dim=1)) / tokens.clamp(min=1))
        keep = ((geometric >= low) & (geometric <= high)) | (tokens == 0)
        metrics["masked_sequences"] = (~keep).float().sum()
        return keep.float().unsqueeze(-1).expand_as(mask), metrics
    return torch.ones_like(mask), metrics
