"""GRPO-family RL (`polytrain grpo`): sample a group of completions per prompt, score them with reward functions,
and push the policy towards the better ones with the clipped surrogate of algorithms/grpo.py.

Rewards are gathered over the data-parallel ranks so advantages are computed over the global batch; the behaviour
log-probabilities (with several optimizer steps per rollout) and the reference's (with a KL term) are stored with
each rollout (see objectives/rollout.py for the rollout cycle).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from polytrain.algorithms.grpo import aggregate, clipped_surrogate, group_advantages, kl_estimate, mismatch_correction
from polytrain.config import JobConfig
from polytrain.data.dataset import IGNORE
from polytrain.data.prompts import PromptItem
from polytrain.errors import ConfigError, PolytrainError
from polytrain.models.registry import spec_for
from polytrain.objectives.base import Metric
from polytrain.objectives.context import ObjectiveContext
from polytrain.objectives.rollout import Rollout, RolloutObjective
from polytrain.rollout.engine import BuiltinEngine
from polytrain.rollout.generate import SamplingConfig
from polytrain.rollout.rewards import Rewards, exact_match

REWARD_ERRORS_FILE = "reward_errors.jsonl"


class RewardError(PolytrainError):
    """A reward function failed and grpo.on_reward_error = "stop"."""


class GRPOObjective(RolloutObjective):
    name = "grpo"
    supports_context_parallel = True  # rollouts sampled whole; the update step trains on each rank's row chunks
    headline = (Metric("reward", "reward"), Metric("reward_std", "reward std"),
                Metric("completion_len", "response len", ".1f"), Metric("clip_fraction", "clip", ".3f"),
                Metric("kl", "KL", ".4f"))
    loss_label = "clipped surrogate loss (+ KL)"
    sum_keys = ("loss_sum", "pg_sum", "kl_sum", "clipped_tokens", "ratio_sum", "mismatch_k3", "capped_tokens",
                "masked_sequences")

    def __init__(self, ctx: ObjectiveContext) -> None:
        cfg = ctx.config.section("grpo")
        self.cfg = cfg
        super().__init__(ctx)
        self.rewards = Rewards(cfg.rewards, cfg.reward_weights)
        self.reference: nn.Module | None = None
        model = ctx.config.model
        if cfg.routing_replay:
            if not spec_for(model).model_class.supports_routing_replay:
                raise ConfigError(f"grpo.routing_replay is not supported for {model.architecture} models yet: their "
                                  f"cached sampler prefills right-aligned rows, which the routing record does not map")
            if ctx.config.parallel.sequence_parallel and ctx.config.parallel.tp > 1:
                raise ConfigError("grpo.routing_replay does not support parallel.sequence_parallel yet")
            if ctx.config.parallel.cp > 1:
                raise ConfigError("grpo.routing_replay does not support parallel.cp > 1 yet")
            if cfg.engine == "vllm":
                raise ConfigError("grpo.routing_replay is not available with grpo.engine = \"vllm\": the adapter "
                                  "does not take vLLM's routed experts (only its V2 model runner reports them)")

    @classmethod
    def rollout_shape(cls, config: JobConfig) -> tuple[int, int, int]:
        cfg = config.section("grpo")
        return cfg.group_size, cfg.epochs, cfg.minibatches

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.config.run.seed)

    @classmethod
    def engine_of(cls, config: JobConfig) -> str:
        return config.section("grpo").engine

    @classmethod
    def engine_ranks(cls, config: JobConfig) -> list[int]:
        return config.section("grpo").engine_ranks()

    def sync_bucket_bytes(self) -> int:
        return self.cfg.sync_bucket_mb * 2**20

    def sampler_weights(self) -> str:
        return self.cfg.sampler_weights

    def stop_strings(self) -> list[str]:
        return self.cfg.stop

    def sync_check(self) -> tuple[int, float]:
        return self.cfg.sync_check_rows, self.cfg.sync_check_tolerance

    def after_parallelize(self, model: nn.Module) -> None:
        super().after_parallelize(model)
        if self.cfg.kl_coef > 0:
            self.reference = self.ctx.reference_model()

    # ------------------------------------------------------------------------------------------- rollouts
    def rollout(self, prompts: list[PromptItem], step: int) -> list[Rollout]:
        collectives, g = self.ctx.collectives, self.group_size
        per_rank = len(prompts) // collectives.dp_size
        first = collectives.dp_rank * per_rank
        sampled = self.sample_completions(prompts[first : first + per_rank], step, first, self.cfg.routing_replay)
        rollouts = []
        for prompt, completion in sampled:
            if self.cfg.routing_replay and completion.routing is None:
                raise ConfigError(f"grpo.routing_replay is on but the rollout engine ({self.cfg.engine}) returned no "
                                  "routing")
            rollouts.append(self.make_rollout(prompt, completion))
        if self.cfg.mismatch_correction != "none" and any(r.engine_logp is None for r in rollouts):
            raise ConfigError(f"grpo.mismatch_correction = \"{self.cfg.mismatch_correction}\" needs the engine's "
                              f"log-probs, and the rollout engine ({self.cfg.engine}) returned none")
        failures = self.score(rollouts, step)

        # advantages over the global batch: every rank's rewards in its slot, summed
        everything = torch.zeros(len(prompts) * g + 3, dtype=torch.float64)
        for i, r in enumerate(rollouts):
            everything[first * g + i] = r.reward
        everything[-3] = failures
        everything[-2] = sum(float(r.finished) for r in rollouts)
        everything[-1] = sum(exact_match(r.text, r.prompt.answer) for r in rollouts)
        collectives.dp_sum(everything.mul_(self.reports))
        rewards = everything[:-3].float()
        advantages = group_advantages(rewards, g, self.cfg.scale_rewards, self.cfg.advantage_eps)
        for i, r in enumerate(rollouts):
            r.advantage = float(advantages[first * g + i])
        if int(everything[-3]) and self.cfg.on_reward_error == "stop":
            raise RewardError(f"step {step + 1}: {int(everything[-3])} reward evaluation(s) failed and "
                              f"grpo.on_reward_error = \"stop\"; the samples are in {REWARD_ERRORS_FILE}")
        n = len(rewards)
        self.rollout_stats = {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if n > 1 else 0.0,
            "exact": float(everything[-1]) / n, "finished": float(everything[-2]) / n,
            "reward_errors": float(everything[-3]),
            "solved_groups": float((rewards.view(-1, g).min(dim=1).values > 0).float().mean()),
            "zero_variance_groups": float((rewards.view(-1, g).std(dim=1) == 0).float().mean()),
        }
        if self.steps_per_rollout > 1:
            self.store_logprobs(self.model, rollouts, "old_logp")
            gaps = [(r.old_logp - r.engine_logp).abs() for r in rollouts if r.engine_logp is not None]
            if gaps:  # the engine's log-probs of its samples against the trainer's (mismatch, before correction)
                gap = torch.cat(gaps)
                self.rollout_stats.update(engine_logp_gap_mean=float(gap.mean()), engine_logp_gap_max=float(gap.max()))
        if self.reference is not None:
            self.store_logprobs(self.reference, rollouts, "ref_logp")
        return rollouts

    def score(self, rollouts: list[Rollout], step: int) -> int:
        """Rewards of each rollout; failures are reported and written to reward_errors.jsonl (score 0)."""
        records = []
        for r in rollouts:
            r.reward, failures = self.rewards.score(r.text, r.prompt.answer, r.prompt.text, r.finished)
            for f in failures:
                if len(records) < 3:
                    self.ctx.warn(f"reward `{f.reward}` failed at step {step + 1} ({f.error}) on prompt "
                                      f"{f.prompt!r}, completion {f.completion!r}: scored 0")
                records.append({"step": step + 1, "rank": self.ctx.collectives.rank, **f.__dict__})
        if records and self.reports:
            with (self.ctx.run_dir / REWARD_ERRORS_FILE).open("a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in records)
        return len(records)

    # ----------------------------------------------------------------------------------------------- loss
    def loss(self, model: nn.Module, micro: list[Rollout], ctx: dict) -> tuple[torch.Tensor, dict, int]:
        cfg = self.cfg
        batch = self.batch(micro)
        logp = self.logprobs(model, micro, batch)
        mask = (batch.labels != IGNORE).float()
        old = self.per_token(batch, micro, "old_logp") if micro[0].old_logp is not None else logp.detach()
        advantages = torch.tensor([r.advantage for r in micro], device=logp.device).unsqueeze(-1)
        pg, clipped = clipped_surrogate(logp, old, advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
        zero = torch.zeros((), device=logp.device)
        mismatch = {"mismatch_k3": zero, "capped_tokens": zero, "masked_sequences": zero}
        if micro[0].engine_logp is not None:
            weight, mismatch = mismatch_correction(old, self.per_token(batch, micro, "engine_logp"), mask,
                                                   cfg.mismatch_correction, cfg.mismatch_cap, cfg.mismatch_low,
                                                   cfg.mismatch_high, batch.whole_row_sum)
            mismatch["masked_sequences"] = mismatch["masked_sequences"] * batch.reports
            pg = pg * weight
        per_token = pg
        kl = torch.zeros_like(pg)
        if self.reference is not None:
            kl = kl_estimate(logp, self.per_token(batch, micro, "ref_logp"), cfg.kl_estimator)
            per_token = pg + cfg.kl_coef * kl
        with torch.no_grad():
            row_tokens = batch.whole_row_sum(mask.sum(dim=1)) if batch.split is not None else None
        norms = (ctx["tokens"], ctx["sequences"], cfg.max_new_tokens, row_tokens)
        loss = aggregate(per_token, mask, cfg.loss_aggregation, *norms)
        with torch.no_grad():
            parts = {"loss_sum": loss.detach(), "pg_sum": aggregate(pg, mask, cfg.loss_aggregation, *norms),
                     "kl_sum": (kl * mask).sum() / ctx["tokens"], "clipped_tokens": (clipped * mask).sum(),
                     "ratio_sum": (torch.exp(logp - old) * mask).sum(), **mismatch}
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: dict) -> dict[str, Any]:
        tokens = max(ctx["tokens"], 1.0)
        stats: dict[str, Any] = {"loss": sums["loss_sum"], "pg_loss": sums["pg_sum"],
                                 "clip_fraction": sums["clipped_tokens"] / tokens, "ratio": sums["ratio_sum"] / tokens,
                                 "completion_len": ctx["tokens"] / max(ctx["sequences"], 1.0)}
        if self.reference is not None:
            stats["kl"] = sums["kl_sum"]
        if self.current and self.current[0].engine_logp is not None:
            stats["mismatch_kl"] = sums["mismatch_k3"] / tokens
            if self.cfg.mismatch_correction == "token-tis":
                stats["tis_capped"] = sums["capped_tokens"] / tokens
            if self.cfg.mismatch_correction == "sequence-mask":
                stats["masked_sequences"] = sums["masked_sequences"] / max(ctx["sequences"], 1.0)
        if ctx["fresh"]:
            stats.update(self.rollout_stats)
            stats.update(self.sync_stats)
        return stats

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy answers to the eval prompts: mean reward and exact-match accuracy."""
        if not self.eval_items:
            return {}
        collectives = self.ctx.collectives
        items = self.eval_items
        if self.config.eval.max_batches:
            items = items[: self.config.eval.max_batches * self.config.train.micro_batch_size]
        mine = items[collectives.dp_rank :: collectives.dp_size]
        greedy = SamplingConfig(self.cfg.max_new_tokens, 0.0)
        engine = BuiltinEngine(model, lambda: collectives.decoding(model, self.cfg.sampler_weights))
        prompts = mine or items[:1]  # a rank without prompts still joins every collective
        completions = engine.generate([p.ids for p in prompts], greedy, self.stop_ids)
        sums = torch.zeros(3, dtype=torch.float64)
        if mine:
            for prompt, completion in zip(prompts, completions):
                r = self.make_rollout(prompt, completion)
                reward, _ = self.rewards.score(r.text, prompt.answer, prompt.text, r.finished)
                sums += torch.tensor([reward, exact_match(r.text, prompt.answer), 1.0], dtype=torch.float64)
        collectives.dp_sum(sums.mul_(self.reports))
        count = max(float(sums[2]), 1.0)
        model.train()
        return {"eval_reward": float(sums[0]) / count, "eval_exact": float(sums[1]) / count}
