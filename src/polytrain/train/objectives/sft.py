"""Supervised fine-tuning on chat conversations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polytrain.algorithms.sft import StepTokens, sft_loss
from polytrain.data.dataset import Sample, load_sft_dataset
from polytrain.train.evaluate import evaluate
from polytrain.train.objectives.base import Objective, chunks


class SFTObjective(Objective):
    name = "sft"
    sum_keys = ("loss_sum", "mtp_loss_sum", "aux_loss_weighted")
    supports_pipeline = True

    def load_data(self) -> None:
        data, t = self.config.data, self.trainer
        vocab = self.config.model.vocab_size
        self.train_set = load_sft_dataset(data.train_path, t.tokenizer, t.template, data.max_seq_len, data.loss_on,
                                          vocab)
        self.train_items = self.train_set.samples
        self.eval_set = None
        if data.eval_path:
            self.eval_set = load_sft_dataset(data.eval_path, t.tokenizer, t.template, data.max_seq_len, data.loss_on,
                                             vocab)
            self.eval_items = self.eval_set.samples
        for name, ds in (("train", self.train_set), ("eval", self.eval_set)):
            if ds is not None and (ds.truncated or ds.dropped):
                t.warn(f"{name}: {ds.truncated} conversations cut to data.max_seq_len={data.max_seq_len}, "
                       f"{ds.dropped} dropped (no trained token left)")

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} train conversations ({self.train_set.num_tokens} tokens){eval_part}"

    def begin_step(self, step: int, items: list[Sample]) -> StepTokens:
        return StepTokens.of(items, self.config.model.num_nextn_predict_layers)

    def forward_backward(self, model: nn.Module, items: list[Sample], ctx: StepTokens,
                         factor: float) -> torch.Tensor:
        pipeline = self.trainer.runtime.pipeline
        if pipeline is None:
            return super().forward_backward(model, items, ctx, factor)
        sums = torch.zeros(len(self.sum_keys) + 1, dtype=torch.float64)
        batch = self.trainer.batches.pipeline(chunks(items, self.config.train.micro_batch_size))
        with self.trainer.autocast():
            sums[0] = pipeline.train_step(batch, ctx.main) * factor
        sums[-1] = batch.num_tokens
        self.trainer.runtime.pp_sum(sums[:-1])
        return sums

    def loss(self, model: nn.Module, micro: list[Sample], ctx: StepTokens) -> tuple[torch.Tensor, dict, int]:
        batch = self.trainer.batches.micro(micro)
        loss, parts = sft_loss(model, batch, ctx, self.config.train.mtp_loss_weight)
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], ctx: StepTokens) -> dict[str, Any]:
        stats: dict[str, Any] = {"loss": sums["loss_sum"] / ctx.main, "trained_tokens": ctx.main}
        if self.config.model.num_nextn_predict_layers:
            stats["mtp_loss"] = sums["mtp_loss_sum"] / max(sum(ctx.mtp), 1)
        if self.config.model.aux_loss_alpha > 0:
            stats["aux_loss"] = sums["aux_loss_weighted"]
        return stats

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.eval_items:
            return {}
        t = self.trainer
        loss = evaluate(model, self.eval_items, t.runtime, t.batches, self.config.train.micro_batch_size,
                        self.config.eval.max_batches, t.autocast)
        return {"eval_loss": loss}
