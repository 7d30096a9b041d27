"""Preference objectives: DPO and its family (`polytrain dpo`) and reward-model training (`polytrain rm`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polytrain.algorithms.logprobs import batch_logprobs, sequence_logprobs
from polytrain.algorithms.preference import REFERENCE_FREE, bradley_terry_losses, dpo_losses
from polytrain.data.dataset import full_sample
from polytrain.data.packing import Batch, reports
from polytrain.data.preference import PreferencePair, load_preference_pairs
from polytrain.errors import ConfigError
from polytrain.models.reward import build_reward_model
from polytrain.objectives.base import Metric, Objective
from polytrain.objectives.context import ObjectiveContext


class PairObjective(Objective):
    """Shared by DPO and RM: preference-pair data, pair batches, eval over pairs."""

    def load_data(self) -> None:
        data, ctx = self.config.data, self.ctx
        vocab = self.config.model.vocab_size
        self.train_items, dropped = load_preference_pairs(data.train_path, ctx.tokenizer, ctx.template,
                                                          data.max_seq_len, vocab)
        if dropped:
            ctx.warn(f"train: {dropped} pairs dropped: no scored reply fits in data.max_seq_len={data.max_seq_len}")
        if data.eval_path:
            self.eval_items, dropped = load_preference_pairs(data.eval_path, ctx.tokenizer, ctx.template,
                                                             data.max_seq_len, vocab)
            if dropped:
                ctx.warn(f"eval: {dropped} pairs dropped (too long)")

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} preference pairs{eval_part}"

    def pair_batch(self, pairs: list[PreferencePair]) -> Batch:
        samples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return self.ctx.batches.micro(samples, packing=False)

    def dry_run_items(self, count: int, generator: torch.Generator) -> list[PreferencePair]:
        length, vocab = self.config.data.max_seq_len, self.config.model.vocab_size
        return [PreferencePair(full_sample(length, vocab, generator), full_sample(length, vocab, generator),
                               ref_chosen=0.0, ref_rejected=0.0) for _ in range(count)]

    def begin_step(self, step: int, items: list[PreferencePair]) -> dict[str, int]:
        return {"pairs": len(items), "chosen_tokens": sum(p.chosen.num_loss_tokens for p in items)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_items:
            return {}
        mbs = self.config.train.micro_batch_size
        mine, count = self.eval_share()
        model.eval()
        sums = torch.zeros(len(self.sum_keys) + 1, dtype=torch.float64)
        ctx = {"pairs": 1, "chosen_tokens": 1}
        counts = reports(self.ctx.batches.split)  # context-parallel ranks compute the same pairs: one counts them
        for b in range(count):  # every rank runs `count` passes; a rank out of pairs repeats one, weighted 0
            micro = mine[b * mbs : (b + 1) * mbs]
            with self.ctx.autocast():
                _, parts, _ = self.loss(model, micro or self.eval_items[:1], ctx)
            weight = 1.0 if micro else 0.0
            for i, key in enumerate(self.sum_keys):
                sums[i] += weight * float(parts.get(key, 0.0))
            sums[-1] += weight * len(micro) * counts
        self.ctx.collectives.dp_sum(sums)
        model.train()
        values = dict(zip(self.sum_keys, sums.tolist()))
        pairs = max(float(sums[-1]), 1.0)
        metrics = {"eval_loss": values["loss_sum"] / pairs, "eval_accuracy": values["correct"] / pairs,
                   "eval_margin": values["margin_sum"] / pairs}
        if "policy_correct" in values:
            metrics["eval_policy_accuracy"] = values["policy_correct"] / pairs
        return metrics


class DPOObjective(PairObjective):
    name = "dpo"
    supports_context_parallel = True  # chosen and rejected rows both split; sequence sums over the cp ranks
    headline = (Metric("loss", "loss"), Metric("reward_margin", "margin"), Metric("accuracy", "accuracy", ".3f"))
    loss_label = "DPO loss per pair"
    sum_keys = ("loss_sum", "correct", "margin_sum", "chosen_logp_sum", "rejected_logp_sum", "sft_sum",
                "policy_correct")

    def __init__(self, ctx: ObjectiveContext) -> None:
        super().__init__(ctx)
        self.cfg = self.config.section("dpo")
        if self.cfg.loss in REFERENCE_FREE and self.cfg.reference != "none":
            self.cfg.reference = "none"  # SimPO and ORPO never look at a reference
        if self.cfg.loss not in REFERENCE_FREE and self.cfg.reference == "none":
            raise ConfigError(f"dpo.loss = \"{self.cfg.loss}\" needs a reference: set dpo.reference = \"model\" or "
                              "\"precomputed\" (or use a reference-free loss: simpo, orpo)")
        self.reference: nn.Module | None = None

    def load_data(self) -> None:
        super().load_data()
        if self.cfg.reference != "precomputed":
            return
        data = self.config.data
        for items, path, key in ((self.train_items, data.train_path, "train_path"),
                                 (self.eval_items, data.eval_path, "eval_path")):
            missing = items.missing_reference() if items is not None else []
            if missing:
                raise ConfigError(
                    f"dpo.reference = \"precomputed\" but {len(missing)} pairs of {path} lack ref_chosen_logp / "
                    f"ref_rejected_logp (first: pair {missing[0] + 1}); write them with `polytrain dpo CONFIG "
                    f"--set data.train_path=\"{path}\" --precompute-reference OUT.jsonl` and set data.{key} = OUT.jsonl"
                )

    def after_parallelize(self, model: nn.Module) -> None:
        if self.cfg.reference == "model":
            self.reference = self.ctx.reference_model()

    def reference_logprobs(self, pairs: list[PreferencePair], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(pairs)
        if self.cfg.reference == "precomputed":
            values = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs], dtype=torch.float32,
                                  device=batch.input_ids.device)
            return values[:, 0], values[:, 1]
        if self.cfg.reference == "none":
            zeros = torch.zeros(n, device=batch.input_ids.device)
            return zeros, zeros
        with torch.no_grad():
            ref, _ = sequence_logprobs(batch_logprobs(self.reference, batch), batch.labels)
            ref = batch.whole_row_sum(ref)
        return ref[:n], ref[n:]

    def loss(self, model: nn.Module, micro: list[PreferencePair], ctx: dict) -> tuple[torch.Tensor, dict, int]:
        n = len(micro)
        batch = self.pair_batch(micro)
        logp, lengths = sequence_logprobs(batch_logprobs(model, batch), batch.labels)
        logp, lengths = batch.whole_row_sum(logp), batch.whole_row_sum(lengths)
        ref_w, ref_l = self.reference_logprobs(micro, batch)
        losses, margin = dpo_losses(self.cfg, logp[:n], logp[n:], ref_w, ref_l, lengths[:n], lengths[n:])
        loss = losses.sum() / ctx["pairs"]
        sft = -logp[:n].sum()
        if self.cfg.sft_weight > 0:
            loss = loss + self.cfg.sft_weight * sft / max(ctx["chosen_tokens"], 1)
        beta = self.cfg.beta
        parts = {"loss_sum": losses.detach().sum(), "correct": (margin > 0).sum(),
                 "margin_sum": (beta * margin).detach().sum(), "chosen_logp_sum": logp[:n].detach().sum(),
                 "rejected_logp_sum": logp[n:].detach().sum(), "sft_sum": sft.detach(),
                 # does the policy itself rank the pair right (per-token average log-probability)?
                 "policy_correct": (logp[:n] / lengths[:n].clamp(min=1) > logp[n:] / lengths[n:].clamp(min=1)).sum()}
        if not batch.reports:
            parts = {key: torch.zeros_like(value) for key, value in parts.items()}
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: dict) -> dict[str, Any]:
        pairs = ctx["pairs"]
        stats = {"loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs,
                 "reward_margin": sums["margin_sum"] / pairs, "chosen_logp": sums["chosen_logp_sum"] / pairs,
                 "rejected_logp": sums["rejected_logp_sum"] / pairs, "policy_accuracy": sums["policy_correct"] / pairs}
        if self.cfg.sft_weight > 0:
            stats["sft_loss"] = sums["sft_sum"] / max(ctx["chosen_tokens"], 1)
        return stats

    @torch.no_grad()
    def precompute_reference(self, out: str) -> dict[str, Any]:
        """Write the training pairs with the starting model's log-probabilities (one process)."""
        import json

        if self.ctx.collectives.world_size > 1:
            raise ConfigError("--precompute-reference runs as a single process")
        self.cfg.reference = "model"
        reference = self.ctx.reference_model()
        items, size = self.train_items, self.config.train.micro_batch_size
        records = items.records()
        with open(out, "w") as handle:
            for start in range(0, len(items), size):
                part = items[start : start + size]
                batch = self.pair_batch(part)
                logp, _ = sequence_logprobs(batch_logprobs(reference, batch), batch.labels)
                for i in range(len(part)):
                    record = {**next(records), "ref_chosen_logp": float(logp[i]),
                              "ref_rejected_logp": float(logp[len(part) + i])}
                    handle.write(json.dumps(record, default=str) + "\n")
        return {"out": out, "pairs": len(self.train_items)}


class RewardObjective(PairObjective):
    name = "rm"
    headline = (Metric("loss", "loss"), Metric("reward_margin", "margin"), Metric("accuracy", "accuracy", ".3f"))
    loss_label = "Bradley-Terry loss per pair"
    sum_keys = ("loss_sum", "correct", "margin_sum")

    def build_model(self, device: torch.device) -> nn.Module:
        return build_reward_model(self.config.model, device, seed=self.config.run.seed)

    def rewards(self, model: nn.Module, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        n = len(pairs)
        batch = self.pair_batch(pairs)
        last = (batch.doc_ids >= 0).sum(dim=1) - 1
        reward = model.reward(batch.input_ids, batch.position_ids, last, token_mask=batch.doc_ids >= 0)
        return reward[:n], reward[n:], batch

    def loss(self, model: nn.Module, micro: list[PreferencePair], ctx: dict) -> tuple[torch.Tensor, dict, int]:
        reward_w, reward_l, batch = self.rewards(model, micro)
        margin = torch.tensor([p.margin for p in micro], device=reward_w.device)
        losses = bradley_terry_losses(reward_w, reward_l, margin)
        parts = {"loss_sum": losses.detach().sum(), "correct": (reward_w > reward_l).sum(),
                 "margin_sum": (reward_w - reward_l).detach().sum()}
        return losses.sum() / ctx["pairs"], parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: dict) -> dict[str, Any]:
        pairs = ctx["pairs"]
        return {"loss": sums["loss_sum"] / pairs, "accuracy": sums["correct"] / pairs,
                "reward_margin": sums["margin_sum"] / pairs}
