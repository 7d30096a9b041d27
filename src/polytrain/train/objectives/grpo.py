"""GRPO-family RL (`polytrain grpo`): sample a group of completions per prompt, score them with reward functions,
and push the policy towards the better ones with the clipped surrogate of algorithms/grpo.py.

One rollout feeds `grpo.epochs x grpo.minibatches` optimizer steps: at the first of them the step's
`train.global_batch_size` prompts are sampled `group_size` times (each data-parallel rank samples its share of the
prompts, whole groups), rewards are gathered so advantages are computed over the global batch, and the behaviour
log-probabilities (and the reference's, with a KL term) are stored. Each following step trains on one minibatch of
the stored completions. Checkpoints and stops happen only at rollout boundaries, so a resumed run never needs a
rollout it did not save.

Sampling draws one uniform per completion row from a generator seeded by (run seed, step, completion index), so the
rollouts, and therefore the gradients, are the same for any number of data-parallel ranks or micro-batch split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polytrain.algorithms.grpo import aggregate, clipped_surrogate, group_advantages, kl_estimate
from polytrain.algorithms.logprobs import batch_logprobs
from polytrain.data.chat import stop_token_ids
from polytrain.data.dataset import IGNORE, Sample, make_sample
from polytrain.data.packing import Batch, collate
from polytrain.data.prompts import PromptItem, load_prompts
from polytrain.errors import ConfigError, PolytrainError
from polytrain.rollout.engine import BuiltinEngine, Completion, RolloutEngine
from polytrain.rollout.generate import SamplingConfig
from polytrain.rollout.rewards import Rewards, exact_match
from polytrain.rollout.routing import batch_routing, replayed
from polytrain.train.objectives.base import Objective, chunks

if TYPE_CHECKING:
    from polytrain.train.trainer import Trainer

REWARD_ERRORS_FILE = "reward_errors.jsonl"


class RewardError(PolytrainError):
    """A reward function failed and grpo.on_reward_error = "stop"."""


@dataclass
class Rollout:
    """One sampled completion and everything the loss needs about it."""

    prompt: PromptItem
    tokens: list[int]
    finished: bool
    text: str
    sample: Sample
    reward: float = 0.0
    advantage: float = 0.0
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    routing: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def span(self) -> slice:
        """Where the completion's tokens sit in the sample's labels (and in a right-padded batch row)."""
        start = len(self.prompt.ids) - 1
        return slice(start, start + len(self.tokens))


def row_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_048_583 + index) % (2**63)


def load_engine(spec: str, trainer: Trainer, model: nn.Module) -> RolloutEngine:
    """`builtin`, or 'module:Class' constructed with the job config (an external engine, e.g. a vLLM client)."""
    if spec == "builtin":
        return BuiltinEngine(model, keep_going=trainer.runtime.any_rank)
    import importlib

    if ":" not in spec:
        raise ConfigError(f"grpo.engine = \"{spec}\": expected builtin or 'module:Class'")
    module_name, attr = spec.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"grpo.engine = \"{spec}\" cannot be imported ({err})") from None
    engine = cls(trainer.config)
    for method in ("generate", "update_weights"):
        if not callable(getattr(engine, method, None)):
            raise ConfigError(f"grpo.engine {spec} has no `{method}` method (see polytrain.rollout.engine)")
    return engine


def full_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter and buffer; sharded (DTensor) ones are gathered (a collective)."""
    from torch.distributed.tensor import DTensor

    return [(name, t.full_tensor() if isinstance(t, DTensor) else t.detach())
            for name, t in model.state_dict().items()]


class RolloutObjective(Objective):
    """Shared by GRPO and on-policy distillation: prompts, sampling, stored rollouts and minibatches."""

    watch_loss_spikes = False  # a policy-gradient loss has no stable level to spike from

    group_size = 1
    epochs = 1
    minibatches = 1

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.steps_per_rollout = self.epochs * self.minibatches
        self.buffer: list[Rollout] = []
        self.current: list[Rollout] = []
        self.rollout_stats: dict[str, float] = {}
        self.engine: RolloutEngine | None = None
        self.model: nn.Module | None = None

    @property
    def sampling(self) -> SamplingConfig:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- set-up
    def check_layout(self, dp: int) -> None:
        cfg, train = self.config, self.config.train
        name = self.name
        if train.global_batch_size % dp:
            raise ConfigError(f"train.global_batch_size = {train.global_batch_size} prompts must be a multiple of "
                              f"the {dp} data-parallel ranks")
        completions = train.global_batch_size // dp * self.group_size
        if completions % self.minibatches or (completions // self.minibatches) % train.micro_batch_size:
            raise ConfigError(
                f"{name}: each rank samples global_batch_size / ranks x group_size = {completions} completions per "
                f"rollout; that must split into {self.minibatches} minibatch(es) of whole micro-batches of "
                f"train.micro_batch_size = {train.micro_batch_size}"
            )
        s = self.steps_per_rollout
        if s > 1 and (train.steps % s or (cfg.checkpoint.every and cfg.checkpoint.every % s)):
            raise ConfigError(f"{name}: one rollout feeds {s} optimizer steps (epochs x minibatches), so "
                              f"train.steps = {train.steps} and checkpoint.every = {cfg.checkpoint.every} must be "
                              f"multiples of {s}")

    def max_prompt_len(self) -> int:
        limit = self.config.data.max_seq_len - self.sampling.max_new_tokens
        if limit < 2:
            raise ConfigError(f"data.max_seq_len = {self.config.data.max_seq_len} leaves no room for a prompt next "
                              f"to max_new_tokens = {self.sampling.max_new_tokens}")
        return limit

    def load_data(self) -> None:
        data, t = self.config.data, self.trainer
        limit = self.max_prompt_len()
        self.train_items, dropped = load_prompts(data.train_path, t.tokenizer, t.template, limit)
        if dropped:
            t.warn(f"train: {dropped} prompts dropped: longer than data.max_seq_len - max_new_tokens = {limit} tokens")
        if data.eval_path:
            self.eval_items, dropped = load_prompts(data.eval_path, t.tokenizer, t.template, limit)
            if dropped:
                t.warn(f"eval: {dropped} prompts dropped (longer than {limit} tokens)")
        self.stop_ids = stop_token_ids(t.template, t.tokenizer)

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} prompts x {self.group_size} samples{eval_part}"

    def after_parallelize(self, model: nn.Module) -> None:
        self.model = model
        self.engine = load_engine(self.engine_spec(), self.trainer, model)
        if not isinstance(self.engine, BuiltinEngine):
            self.engine.update_weights(full_weights(model))

    def engine_spec(self) -> str:
        return "builtin"

    def can_stop_after(self, step: int) -> bool:
        return step % self.steps_per_rollout == 0

    # ------------------------------------------------------------------------------------------------ steps
    def step_items(self, step: int) -> list[Any] | None:
        if step % self.steps_per_rollout == 0:
            return super().step_items(step)
        return None

    def begin_step(self, step: int, items: list[PromptItem] | None) -> dict[str, float]:
        fresh = items is not None
        if fresh:
            self.buffer = self.rollout(items, step)
        index = (step % self.steps_per_rollout) % self.minibatches
        size = len(self.buffer) // self.minibatches
        self.current = self.buffer[index * size : (index + 1) * size]
        counts = torch.tensor([sum(len(r.tokens) for r in self.current), len(self.current)], dtype=torch.float64)
        self.trainer.runtime.dp_sum(counts)
        return {"tokens": float(counts[0]), "sequences": float(counts[1]), "fresh": fresh}

    def my_share(self, items: list[Any] | None) -> list[Rollout]:
        return self.current

    def sample_completions(self, prompts: list[PromptItem], step: int, first_index: int,
                           record_routing: bool = False) -> list[tuple[PromptItem, Completion]]:
        """`group_size` completions of each prompt (in order), seeded per completion."""
        g = self.group_size
        ids = [p.ids for p in prompts for _ in range(g)]
        seeds = [row_seed(self.config.run.seed, step, first_index * g + i) for i in range(len(ids))]
        completions = self.engine.generate(ids, self.sampling, self.stop_ids, record_routing=record_routing,
                                           row_seeds=seeds)
        if len(completions) != len(ids):
            raise PolytrainError(f"the rollout engine returned {len(completions)} completions for {len(ids)} prompts")
        return [(prompts[i // g], c) for i, c in enumerate(completions)]

    def make_rollout(self, prompt: PromptItem, completion: Completion) -> Rollout:
        tokens, finished = list(completion.tokens), completion.finished
        text = self._text(tokens, finished)
        tokens, finished, text = self._apply_stop_strings(tokens, finished, text)
        ids = prompt.ids + tokens
        sample = make_sample(ids, [False] * len(prompt.ids) + [True] * len(tokens), len(ids))
        routing = None
        if completion.routing is not None:
            routing = [r[: len(ids) - 1] for r in completion.routing]
        return Rollout(prompt, tokens, finished, text, sample, routing=routing)

    def _text(self, tokens: list[int], finished: bool) -> str:
        body = tokens[:-1] if finished and tokens and tokens[-1] in self.stop_ids else tokens
        return self.trainer.tokenizer.decode(body)

    def stop_strings(self) -> list[str]:
        return []

    def _apply_stop_strings(self, tokens: list[int], finished: bool, text: str) -> tuple[list[int], bool, str]:
        """Cut at the first configured stop string: the completion keeps the tokens up to the one that completes it."""
        cuts = [i for s in self.stop_strings() if (i := text.find(s)) >= 0]
        if not cuts:
            return tokens, finished, text
        decode = self.trainer.tokenizer.decode
        for k in range(1, len(tokens) + 1):
            if any(s in decode(tokens[:k]) for s in self.stop_strings()):
                return tokens[:k], True, text[: min(cuts)]
        return tokens, finished, text

    def rollout(self, prompts: list[PromptItem], step: int) -> list[Rollout]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ log-probs
    def batch(self, rollouts: list[Rollout]) -> Batch:
        return collate([r.sample for r in rollouts], self.config.data.max_seq_len,
                       packing=False).to(self.trainer.device)

    def routing_for(self, rollouts: list[Rollout], batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if rollouts[0].routing is None:
            return None
        return [(e.to(batch.input_ids.device), k.to(batch.input_ids.device))
                for e, k in batch_routing([r.routing for r in rollouts], batch.input_ids.shape[1])]

    def logits(self, model: nn.Module, rollouts: list[Rollout], batch: Batch) -> torch.Tensor:
        """Full-vocabulary logits (distillation compares whole distributions), routing replayed."""
        with replayed(model, self.routing_for(rollouts, batch)), self.trainer.autocast():
            return model(batch.input_ids, position_ids=batch.position_ids, token_mask=batch.doc_ids >= 0)

    def logprobs(self, model: nn.Module, rollouts: list[Rollout], batch: Batch) -> torch.Tensor:
        """log p of each label token (chunked output head: no full-vocabulary logits), routing replayed."""
        with replayed(model, self.routing_for(rollouts, batch)), self.trainer.autocast():
            return batch_logprobs(model, batch)

    def per_token(self, batch: Batch, rollouts: list[Rollout], attr: str) -> torch.Tensor:
        """A stored per-completion-token value laid out like `batch.labels` (0 elsewhere)."""
        out = torch.zeros(batch.labels.shape, dtype=torch.float32, device=batch.labels.device)
        for row, r in enumerate(rollouts):
            out[row, r.span] = getattr(r, attr).to(out.device)
        return out

    @torch.no_grad()
    def store_logprobs(self, model: nn.Module, rollouts: list[Rollout], attr: str) -> None:
        """Per-token log-probs of each rollout's completion under `model`, kept on the rollout (CPU)."""
        was_training = model.training
        model.eval()  # no expert-load counting for passes that are not trained on
        for micro in chunks(rollouts, self.config.train.micro_batch_size):
            batch = self.batch(micro)
            logp = self.logprobs(model, micro, batch).cpu()
            for row, r in enumerate(micro):
                setattr(r, attr, logp[row, r.span].clone())
        model.train(was_training)

    def end_step(self, step: int) -> None:
        if step % self.steps_per_rollout == 0 and not isinstance(self.engine, BuiltinEngine):
            self.engine.update_weights(full_weights(self.model))


class GRPOObjective(RolloutObjective):
    name = "grpo"
    sum_keys = ("loss_sum", "pg_sum", "kl_sum", "clipped_tokens", "ratio_sum")

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.config.grpo
        self.cfg = cfg
        self.group_size, self.epochs, self.minibatches = cfg.group_size, cfg.epochs, cfg.minibatches
        super().__init__(trainer)
        self.rewards = Rewards(cfg.rewards, cfg.reward_weights)
        self.reference: nn.Module | None = None
        model = trainer.config.model
        if cfg.routing_replay:
            if not model.n_routed_experts or model.is_v4:
                raise ConfigError("grpo.routing_replay needs a DeepSeek-V3-style MoE model (routers and a KV-cache "
                                  "sampler); this model has none")
            if trainer.config.parallel.sequence_parallel:
                raise ConfigError("grpo.routing_replay does not support parallel.sequence_parallel yet")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.config.run.seed)

    def engine_spec(self) -> str:
        return self.cfg.engine

    def stop_strings(self) -> list[str]:
        return self.cfg.stop

    def after_parallelize(self, model: nn.Module) -> None:
        super().after_parallelize(model)
        if self.cfg.kl_coef > 0:
            from polytrain.train.reference import build_reference

            self.reference = build_reference(self.trainer)

    # ------------------------------------------------------------------------------------------- rollouts
    def rollout(self, prompts: list[PromptItem], step: int) -> list[Rollout]:
        runtime, g = self.trainer.runtime, self.group_size
        per_rank = len(prompts) // runtime.dp_size
        first = runtime.dp_rank * per_rank
        sampled = self.sample_completions(prompts[first : first + per_rank], step, first, self.cfg.routing_replay)
        rollouts = []
        for prompt, completion in sampled:
            if self.cfg.routing_replay and completion.routing is None:
                raise ConfigError(f"grpo.routing_replay is on but the rollout engine ({self.cfg.engine}) returned no "
                                  "routing")
            rollouts.append(self.make_rollout(prompt, completion))
        failures = self.score(rollouts, step)

        # advantages over the global batch: every rank's rewards in its slot, summed
        everything = torch.zeros(len(prompts) * g + 3, dtype=torch.float64)
        for i, r in enumerate(rollouts):
            everything[first * g + i] = r.reward
        everything[-3] = failures
        everything[-2] = sum(float(r.finished) for r in rollouts)
        everything[-1] = sum(exact_match(r.text, r.prompt.answer) for r in rollouts)
        runtime.dp_sum(everything)
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
                    self.trainer.warn(f"reward `{f.reward}` failed at step {step + 1} ({f.error}) on prompt "
                                      f"{f.prompt!r}, completion {f.completion!r}: scored 0")
                records.append({"step": step + 1, "rank": self.trainer.runtime.rank, **f.__dict__})
        if records:
            with (self.trainer.run_dir / REWARD_ERRORS_FILE).open("a") as handle:
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
        per_token = pg
        kl = torch.zeros_like(pg)
        if self.reference is not None:
            kl = kl_estimate(logp, self.per_token(batch, micro, "ref_logp"), cfg.kl_estimator)
            per_token = pg + cfg.kl_coef * kl
        norms = (ctx["tokens"], ctx["sequences"], cfg.max_new_tokens)
        loss = aggregate(per_token, mask, cfg.loss_aggregation, *norms)
        with torch.no_grad():
            parts = {"loss_sum": loss.detach(), "pg_sum": aggregate(pg, mask, cfg.loss_aggregation, *norms),
                     "kl_sum": (kl * mask).sum() / ctx["tokens"], "clipped_tokens": (clipped * mask).sum(),
                     "ratio_sum": (torch.exp(logp - old) * mask).sum()}
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: dict) -> dict[str, Any]:
        tokens = max(ctx["tokens"], 1.0)
        stats: dict[str, Any] = {"loss": sums["loss_sum"], "pg_loss": sums["pg_sum"],
                                 "clip_fraction": sums["clipped_tokens"] / tokens, "ratio": sums["ratio_sum"] / tokens,
                                 "completion_len": ctx["tokens"] / max(ctx["sequences"], 1.0)}
        if self.reference is not None:
            stats["kl"] = sums["kl_sum"]
        if ctx["fresh"]:
            stats.update(self.rollout_stats)
        return stats

    # ------------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy answers to the eval prompts: mean reward and exact-match accuracy."""
        if not self.eval_items:
            return {}
        runtime = self.trainer.runtime
        items = self.eval_items
        if self.config.eval.max_batches:
            items = items[: self.config.eval.max_batches * self.config.train.micro_batch_size]
        mine = items[runtime.dp_rank :: runtime.dp_size]
        greedy = SamplingConfig(self.cfg.max_new_tokens, 0.0)
        engine = BuiltinEngine(model, keep_going=runtime.any_rank)
        prompts = mine or items[:1]  # a rank without prompts still joins every collective
        completions = engine.generate([p.ids for p in prompts], greedy, self.stop_ids)
        sums = torch.zeros(3, dtype=torch.float64)
        if mine:
            for prompt, completion in zip(prompts, completions):
                r = self.make_rollout(prompt, completion)
                reward, _ = self.rewards.score(r.text, prompt.answer, prompt.text, r.finished)
                sums += torch.tensor([reward, exact_match(r.text, prompt.answer), 1.0], dtype=torch.float64)
        runtime.dp_sum(sums)
        count = max(float(sums[2]), 1.0)
        model.train()
        return {"eval_reward": float(sums[0]) / count, "eval_exact": float(sums[1]) / count}
