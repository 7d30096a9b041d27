"""What the RL-style objectives share (GRPO, on-policy distillation): prompts, sampling through a rollout engine,
stored rollouts and their minibatches.

One rollout feeds `epochs x minibatches` optimizer steps: at the first of them the step's `train.global_batch_size`
prompts are sampled `group_size` times (each data-parallel rank samples its share of the prompts, whole groups) and
stored with what the loss needs; each following step trains on one minibatch of the stored completions.
Checkpoints and stops happen only at rollout boundaries, so a resumed run never needs a rollout it did not save.

Sampling draws one uniform per completion row from a generator seeded by (run seed, step, completion index), so the
rollouts, and therefore the gradients, are the same for any number of data-parallel ranks or micro-batch split.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polytrain.algorithms.logprobs import batch_logprobs
from polytrain.data.chat import stop_token_ids
from polytrain.data.dataset import Sample, make_sample
from polytrain.data.packing import Batch, reports
from polytrain.data.prompts import PromptItem, load_prompts
from polytrain.errors import ConfigError, PolytrainError
from polytrain.objectives.base import Objective, chunks
from polytrain.objectives.context import ObjectiveContext
from polytrain.objectives.placement import PlacedEngine, rollout_hosts, together
from polytrain.rollout.engine import (
    Bucket,
    BuiltinEngine,
    Completion,
    RolloutEngine,
    receives_weights,
    weight_dtype,
)
from polytrain.rollout.generate import SamplingConfig
from polytrain.rollout.routing import batch_routing, replayed

if TYPE_CHECKING:
    from polytrain.config import JobConfig


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
    engine_logp: torch.Tensor | None = None
    """The rollout engine's log-probs of the completion's tokens, when it reports them."""
    routing: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def span(self) -> slice:
        """Where the completion's tokens sit in the sample's labels (and in a right-padded batch row)."""
        start = len(self.prompt.ids) - 1
        return slice(start, start + len(self.tokens))


def row_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_048_583 + index) % (2**63)


def load_engine(spec: str, ctx: ObjectiveContext, model: nn.Module, sampler_weights: str = "auto") -> RolloutEngine:
    """`builtin`, `vllm` (polytrain.rollout.vllm_client), or 'module:Class' constructed with the job config (an
    external engine)."""
    if spec == "builtin":
        return BuiltinEngine(model, lambda: ctx.collectives.decoding(model, sampler_weights))
    if spec == "vllm":
        spec = "polytrain.rollout.vllm_client:VLLMEngine"
    import importlib

    if ":" not in spec:
        raise ConfigError(f"grpo.engine = \"{spec}\": expected builtin, vllm or 'module:Class'")
    module_name, attr = spec.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"grpo.engine = \"{spec}\" cannot be imported ({err})") from None
    engine = cls(ctx.config)
    for method in ("generate", "update_weights"):
        if not callable(getattr(engine, method, None)):
            raise ConfigError(f"grpo.engine {spec} has no `{method}` method (see polytrain.rollout.engine)")
    return engine


class SyncCheckError(PolytrainError):
    """After a weight sync, the engine's log-probs are further from the trainer's than grpo.sync_check_tolerance."""


class RolloutObjective(Objective):
    """Shared by GRPO and on-policy distillation: prompts, sampling, stored rollouts and minibatches."""

    watch_loss_spikes = False  # a policy-gradient loss has no stable level to spike from
    items_split_into_micro_batches = False  # prompts per step; their completions make the micro-batches

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.group_size, self.epochs, self.minibatches = self.rollout_shape(ctx.config)
        self.steps_per_rollout = self.epochs * self.minibatches
        self.buffer: list[Rollout] = []
        self.current: list[Rollout] = []
        self.rollout_stats: dict[str, float] = {}
        self.sync_stats: dict[str, float] = {}
        self.engine: RolloutEngine | None = None
        self.engine_stale = False
        """Whether an external engine's weights may differ from the policy's (set up, restored from a checkpoint,
        rolled back): then the next rollout syncs first."""
        self.model: nn.Module | None = None

    @property
    def sampling(self) -> SamplingConfig:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- set-up
    @classmethod
    def rollout_shape(cls, config: JobConfig) -> tuple[int, int, int]:
        """(completions per prompt, passes over each rollout, optimizer steps per pass)."""
        return 1, 1, 1

    @classmethod
    def decodes_in_process(cls, config: JobConfig | None) -> bool:
        """Sampling with the built-in engine, or evaluating (evaluation always samples with it)."""
        return config is None or cls.engine_of(config) == "builtin" or bool(config.data.eval_path)

    @classmethod
    def engine_ranks(cls, config: JobConfig) -> list[int]:
        """The ranks that host the rollout engine for all ranks ([]: every rank its own)."""
        return []

    @classmethod
    def check_world(cls, config: JobConfig, world_size: int) -> None:
        rollout_hosts(cls.engine_ranks(config), world_size)

    @classmethod
    def engine_of(cls, config: JobConfig) -> str:
        """The rollout engine the job samples with (`load_engine`'s spec)."""
        return "builtin"

    @classmethod
    def check_config(cls, config: JobConfig, dp: int) -> None:
        train, name = config.train, cls.name
        group_size, epochs, minibatches = cls.rollout_shape(config)
        if train.global_batch_size % dp:
            raise ConfigError(f"train.global_batch_size = {train.global_batch_size} prompts must be a multiple of "
                              f"the {dp} data-parallel ranks")
        completions = train.global_batch_size // dp * group_size
        if completions % minibatches or (completions // minibatches) % train.micro_batch_size:
            raise ConfigError(
                f"{name}: each rank samples global_batch_size / ranks x group_size = {completions} completions per "
                f"rollout; that must split into {minibatches} minibatch(es) of whole micro-batches of "
                f"train.micro_batch_size = {train.micro_batch_size}"
            )
        s = epochs * minibatches
        if s > 1 and (train.steps % s or (config.checkpoint.every and config.checkpoint.every % s)):
            raise ConfigError(f"{name}: one rollout feeds {s} optimizer steps (epochs x minibatches), so "
                              f"train.steps = {train.steps} and checkpoint.every = {config.checkpoint.every} must be "
                              f"multiples of {s}")

    def max_prompt_len(self) -> int:
        limit = self.config.data.max_seq_len - self.sampling.max_new_tokens
        if limit < 2:
            raise ConfigError(f"data.max_seq_len = {self.config.data.max_seq_len} leaves no room for a prompt next "
                              f"to max_new_tokens = {self.sampling.max_new_tokens}")
        return limit

    def load_data(self) -> None:
        data, ctx = self.config.data, self.ctx
        limit = self.max_prompt_len()
        self.train_items, dropped = load_prompts(data.train_path, ctx.tokenizer, ctx.template, limit)
        if dropped:
            ctx.warn(f"train: {dropped} prompts dropped: longer than data.max_seq_len - max_new_tokens = {limit} "
                     "tokens")
        if data.eval_path:
            self.eval_items, dropped = load_prompts(data.eval_path, ctx.tokenizer, ctx.template, limit)
            if dropped:
                ctx.warn(f"eval: {dropped} prompts dropped (longer than {limit} tokens)")
        self.stop_ids = stop_token_ids(ctx.template, ctx.tokenizer)

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} prompts x {self.group_size} samples{eval_part}"

    def after_parallelize(self, model: nn.Module) -> None:
        self.model = model
        if self.ctx.rollouts:
            self.engine = self.make_engine(model)
            self.engine_stale = True  # synced before the first rollout, once a resumed run has its weights

    def make_engine(self, model: nn.Module) -> RolloutEngine:
        """An engine on every rank, or on the rollout ranks for all of them (objectives/placement.py)."""
        spec, collectives = self.engine_of(self.config), self.ctx.collectives
        hosts = rollout_hosts(self.engine_ranks(self.config), collectives.world_size)
        if collectives.world_size == 1:
            return load_engine(spec, self.ctx, model, self.sampler_weights())
        if not hosts:  # an engine per rank: a rank whose engine fails to start stops them all
            return together(collectives, lambda: load_engine(spec, self.ctx, model, self.sampler_weights()),
                            "starting the rollout engine")
        start = (lambda: load_engine(spec, self.ctx, model)) if collectives.rank in hosts else None
        return PlacedEngine(together(collectives, start, "starting the rollout engine"), hosts, collectives)


    def sync_bucket_bytes(self) -> int:
        return 2**30

    def sampler_weights(self) -> str:
        return "auto"

    def sync_check(self) -> tuple[int, float]:
        """(probe sequences scored after every weight sync, largest mean log-prob gap allowed); 0 rows: no check."""
        return 0, 0.0

    # ------------------------------------------------------------------------------------------ weight sync
    def sync_weights(self) -> None:
        """Hand the policy's weights to an external engine, then check the sync (`check_sync`)."""
        if isinstance(self.engine, BuiltinEngine):
            return
        self.sync_stats = {}
        self.push_weights()
        self.check_sync()

    def push_weights(self) -> None:
        """Stream the policy's weights to an external engine, bucket by bucket, on the
        ranks where it receives them; every rank takes part in every bucket's collective."""
        import time

        start, received = time.perf_counter(), 0
        receives = receives_weights(self.engine)
        buckets = self.ctx.collectives.weight_buckets(self.model, weight_dtype(self.engine), self.sync_bucket_bytes(),
                                                      receives)

        def counted() -> Iterator[Bucket]:
            nonlocal received
            for bucket in buckets:
                received += sum(t.numel() * t.element_size() for _, t in bucket)
                yield bucket

        stream = counted()
        failure: Exception | None = None
        if receives:
            try:
                self.engine.update_weights(stream)
            except Exception as err:  # raised on every rank once every rank has been through every bucket
                failure = err
        for _ in stream:  # the rest, whatever the engine consumed: every bucket is a collective
            pass

        def fail() -> None:
            raise failure

        together(self.ctx.collectives, fail if failure is not None else None, "weight sync")
        if isinstance(self.engine, PlacedEngine):
            self.engine.after_sync()
        self.sync_stats.update(weight_sync_s=time.perf_counter() - start, weight_sync_gib=received / 2**30)

    def check_sync(self) -> None:
        """The engine's log-probs of a fixed probe batch against the trainer's, after a sync (engines with
        `probe_logprobs`). Above the tolerance an engine that can restart (`restart_next_sync`) is restarted from the
        weights and checked again; a gap that remains stops the run (SyncCheckError)."""
        engine = self.engine
        rows, tolerance = self.sync_check()
        if not rows or not getattr(engine, "probes", callable(getattr(engine, "probe_logprobs", None))):
            return
        gap_mean, gap_max = self.probe_gap(rows)
        self.sync_stats.update(sync_gap_mean=gap_mean, sync_gap_max=gap_max, sync_fallback=0.0,
                               **self._engine_timings())
        if gap_mean <= tolerance:
            return
        if getattr(engine, "restarts", callable(getattr(engine, "restart_next_sync", None))) and not (
                self._engine_timings().get("engine_sync_restarted")):
            self.ctx.warn(f"weight sync check: mean |engine - trainer| log-prob gap {gap_mean:.4f} (max "
                          f"{gap_max:.4f}) > grpo.sync_check_tolerance = {tolerance}: restarting the engine from the "
                          "weights")
            engine.restart_next_sync()
            self.push_weights()
            first = {"sync_gap_reload_mean": gap_mean, "sync_gap_reload_max": gap_max}
            gap_mean, gap_max = self.probe_gap(rows)
            self.sync_stats.update(sync_gap_mean=gap_mean, sync_gap_max=gap_max, sync_fallback=1.0, **first,
                                   **self._engine_timings())
            if gap_mean <= tolerance:
                return
        raise SyncCheckError(f"weight sync check: the engine's log-probs are {gap_mean:.4f} (mean) / {gap_max:.4f} "
                             f"(max) from the trainer's on the probe batch, above grpo.sync_check_tolerance = "
                             f"{tolerance}, after starting the engine from the exported weights: it does not serve "
                             "the trained model, or its numerics differ by that much (then raise the tolerance)")

    def _engine_timings(self) -> dict[str, float]:
        return {f"engine_{k}": float(v) for k, v in getattr(self.engine, "timings", {}).items() if k != "generate_s"}

    def probe_sequences(self, rows: int) -> list[list[int]]:
        """Fixed probe batch: the first train prompts followed by their answers (when they have one)."""
        out = []
        for item in self.train_items[:rows]:
            answer = self.ctx.tokenizer.encode(item.answer) if item.answer else []
            out.append((item.ids + answer)[: self.config.data.max_seq_len])
        return out

    @torch.no_grad()
    def probe_gap(self, rows: int) -> tuple[float, float]:
        """(mean, max) |engine - trainer| log-prob over every token of the probe batch after its first."""
        sequences = self.probe_sequences(rows)
        engine_logp = self.engine.probe_logprobs(sequences)
        samples = [make_sample(s, [True] * len(s), len(s)) for s in sequences]
        model = self.model
        was_training = model.training
        model.eval()
        batch = self.ctx.batches.micro(samples, packing=False)
        with self.ctx.autocast():
            trainer_logp = batch.whole_rows(batch_logprobs(model, batch)).float().cpu()
        model.train(was_training)
        gaps = torch.cat([(trainer_logp[row, : len(s) - 1] - torch.tensor(e, dtype=torch.float32)).abs()
                          for row, (s, e) in enumerate(zip(sequences, engine_logp))])
        # the largest over the ranks: each rank's engine may differ, and every rank must take the same branch
        every = self.ctx.collectives.all_gather_objects((float(gaps.mean()), float(gaps.max())))
        return max(m for m, _ in every), max(m for _, m in every)

    def can_stop_after(self, step: int) -> bool:
        return step % self.steps_per_rollout == 0

    # ------------------------------------------------------------------------------------------------ steps
    def takes_items(self, step: int) -> bool:
        return step % self.steps_per_rollout == 0

    def begin_step(self, step: int, items: list[PromptItem] | None) -> dict[str, float]:
        fresh = items is not None
        if fresh:
            if self.engine_stale:
                self.sync_weights()
                self.engine_stale = False
            self.buffer = self.rollout(items, step)
        index = (step % self.steps_per_rollout) % self.minibatches
        size = len(self.buffer) // self.minibatches
        self.current = self.buffer[index * size : (index + 1) * size]
        counts = torch.tensor([sum(len(r.tokens) for r in self.current), len(self.current)], dtype=torch.float64)
        self.ctx.collectives.dp_sum(counts.mul_(self.reports))
        return {"tokens": float(counts[0]), "sequences": float(counts[1]), "fresh": fresh}

    @property
    def reports(self) -> bool:
        """Whether this rank adds its rollouts' numbers to sums over the data-parallel ranks: context-parallel ranks
        hold the same rollouts (each trains on its chunks of them), so only the first does."""
        return reports(self.ctx.batches.split)

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
        engine_logp = None
        if completion.logprobs is not None:
            if len(completion.logprobs) < len(tokens):
                raise PolytrainError(f"the rollout engine returned {len(completion.logprobs)} log-probs for a "
                                     f"completion of {len(tokens)} tokens")
            engine_logp = torch.tensor(completion.logprobs[: len(tokens)], dtype=torch.float32)
        return Rollout(prompt, tokens, finished, text, sample, routing=routing, engine_logp=engine_logp)

    def _text(self, tokens: list[int], finished: bool) -> str:
        body = tokens[:-1] if finished and tokens and tokens[-1] in self.stop_ids else tokens
        return self.ctx.tokenizer.decode(body)

    def stop_strings(self) -> list[str]:
        return []

    def _apply_stop_strings(self, tokens: list[int], finished: bool, text: str) -> tuple[list[int], bool, str]:
        """Cut at the first configured stop string: the completion keeps the tokens up to the one that completes it."""
        cuts = [i for s in self.stop_strings() if (i := text.find(s)) >= 0]
        if not cuts:
            return tokens, finished, text
        decode = self.ctx.tokenizer.decode
        for k in range(1, len(tokens) + 1):
            if any(s in decode(tokens[:k]) for s in self.stop_strings()):
                return tokens[:k], True, text[: min(cuts)]
        return tokens, finished, text

    def rollout(self, prompts: list[PromptItem], step: int) -> list[Rollout]:
        raise NotImplementedError

    def dry_run_items(self, count: int, generator: torch.Generator) -> list[PromptItem]:
        vocab = self.config.model.vocab_size
        return [PromptItem(torch.randint(0, vocab, (self.max_prompt_len(),), generator=generator).tolist(), "", None)
                for _ in range(count)]

    def dry_run_step(self, items: list[PromptItem], generator: torch.Generator) -> tuple[Any, list[Rollout]]:
        """The update step on made-up rollouts: every completion `max_new_tokens` long (no sampling, no scoring);
        the log-probs a rollout stores (old policy, reference, engine) are zeros of the right shape."""
        collectives, new = self.ctx.collectives, self.sampling.max_new_tokens
        per_rank = len(items) // collectives.dp_size
        mine = items[collectives.dp_rank * per_rank : (collectives.dp_rank + 1) * per_rank]
        self.buffer = []
        for prompt in (p for p in mine for _ in range(self.group_size)):
            tokens = torch.randint(0, self.config.model.vocab_size, (new,), generator=generator).tolist()
            ids = prompt.ids + tokens
            sample = make_sample(ids, [False] * len(prompt.ids) + [True] * new, len(ids))
            old = torch.zeros(new) if self.steps_per_rollout > 1 else None
            self.buffer.append(Rollout(prompt, tokens, False, "", sample, advantage=1.0, old_logp=old,
                                       ref_logp=torch.zeros(new), engine_logp=torch.zeros(new)))
        return self.begin_step(0, None), self.my_share(None)

    # ------------------------------------------------------------------------------------------ log-probs
    def batch(self, rollouts: list[Rollout]) -> Batch:
        """One completion per row (with context parallelism: this rank's chunks of each row)."""
        return self.ctx.batches.micro([r.sample for r in rollouts], packing=False)

    def routing_for(self, rollouts: list[Rollout], batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if rollouts[0].routing is None:
            return None
        return [(e.to(batch.input_ids.device), k.to(batch.input_ids.device))
                for e, k in batch_routing([r.routing for r in rollouts], batch.input_ids.shape[1])]

    def logits(self, model: nn.Module, rollouts: list[Rollout], batch: Batch) -> torch.Tensor:
        """Full-vocabulary logits (distillation compares whole distributions), routing replayed."""
        with replayed(model, self.routing_for(rollouts, batch)), self.ctx.autocast():
            return model(batch.input_ids, position_ids=batch.position_ids, token_mask=batch.doc_ids >= 0)

    def logprobs(self, model: nn.Module, rollouts: list[Rollout], batch: Batch) -> torch.Tensor:
        """log p of each label token (chunked output head: no full-vocabulary logits), routing replayed."""
        with replayed(model, self.routing_for(rollouts, batch)), self.ctx.autocast():
            return batch_logprobs(model, batch)

    def per_token(self, batch: Batch, rollouts: list[Rollout], attr: str) -> torch.Tensor:
        """A stored per-completion-token value laid out like `batch.labels` (0 elsewhere; with context parallelism,
        this rank's chunks of each row)."""
        rows, width = batch.labels.shape
        whole = width * (batch.split.size if batch.split is not None else 1)
        out = torch.zeros(rows, whole, dtype=torch.float32, device=batch.labels.device)
        for row, r in enumerate(rollouts):
            out[row, r.span] = getattr(r, attr).to(out.device)
        return batch.local_part(out)

    @torch.no_grad()
    def store_logprobs(self, model: nn.Module, rollouts: list[Rollout], attr: str) -> None:
        """Per-token log-probs of each rollout's completion under `model`, kept on the rollout (CPU)."""
        was_training = model.training
        model.eval()  # no expert-load counting for passes that are not trained on
        for micro in chunks(rollouts, self.config.train.micro_batch_size):
            batch = self.batch(micro)
            logp = batch.whole_rows(self.logprobs(model, micro, batch)).cpu()
            for row, r in enumerate(micro):
                setattr(r, attr, logp[row, r.span].clone())
        model.train(was_training)

    def end_step(self, step: int) -> None:
        if step % self.steps_per_rollout == 0:
            self.sync_weights()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The policy's weights were just restored (resume, or the guard's rollback): the engine's are stale."""
        super().load_state_dict(state)
        self.engine_stale = self.engine is not None
