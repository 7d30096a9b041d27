"""Supervised fine-tuning on chat conversations (`polytrain sft`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from polytrain.algorithms.sft import StepTokens, sft_loss_from_output
from polytrain.data.dataset import Sample, full_sample, load_sft_dataset
from polytrain.data.packing import Batch
from polytrain.models.common.decoder import TrainOutput
from polytrain.objectives.base import Metric, Objective


class SFTObjective(Objective):
    name = "sft"
    sum_keys = ("loss_sum", "mtp_loss_sum", "aux_loss_weighted")
    headline = (Metric("loss", "loss"), Metric("mtp_loss", "MTP loss"))
    loss_label = "cross-entropy per trained token"
    supports_pipeline = True
    supports_context_parallel = True
    train_outputs = True

    def load_data(self) -> None:
        data, ctx = self.config.data, self.ctx
        vocab = self.config.model.vocab_size
        self.train_set = load_sft_dataset(data.train_path, ctx.tokenizer, ctx.template, data.max_seq_len,
                                          data.loss_on, vocab)
        self.train_items = self.train_set.samples
        self.eval_set = None
        if data.eval_path:
            self.eval_set = load_sft_dataset(data.eval_path, ctx.tokenizer, ctx.template, data.max_seq_len,
                                             data.loss_on, vocab)
            self.eval_items = self.eval_set.samples
        for name, ds in (("train", self.train_set), ("eval", self.eval_set)):
            if ds is not None and (ds.truncated or ds.dropped):
                ctx.warn(f"{name}: {ds.truncated} conversations cut to data.max_seq_len={data.max_seq_len}, "
                         f"{ds.dropped} dropped (no trained token left)")

    def describe_data(self) -> str:
        eval_part = f", {len(self.eval_items)} eval" if self.eval_items else ""
        return f"{len(self.train_items)} train conversations ({self.train_set.num_tokens} tokens){eval_part}"

    def pipeline_rows(self) -> int:
        """Packing fills rows one after the other and starts a row only when the next sample does not fit, so every
        row but the last holds at least max_seq_len // (the longest sample) samples: a micro-batch needs at most
        ceil(micro_batch_size / that) rows. Short chat samples then run through a pipeline in a few packed rows
        instead of micro_batch_size mostly padded ones. Every rank loads the same data, so all agree."""
        mbs, data = self.config.train.micro_batch_size, self.config.data
        sets = [ds for ds in (getattr(self, "train_set", None), self.eval_set if self.eval_items else None) if ds]
        if self.config.parallel.pp == 1 or not data.packing or not sets:
            return mbs
        per_row = data.max_seq_len // max(max(ds.longest for ds in sets), 1)
        return min(mbs, -(-mbs // per_row))

    def dry_run_items(self, count: int, generator: torch.Generator) -> list[Sample]:
        return [full_sample(self.config.data.max_seq_len, self.config.model.vocab_size, generator)
                for _ in range(count)]

    def begin_step(self, step: int, items: list[Sample]) -> StepTokens:
        return StepTokens.of(items, self.config.model.num_nextn_predict_layers)

    def samples(self, micro: list[Sample]) -> list[Sample]:
        return micro

    def loss_from_output(self, head: nn.Module, output: TrainOutput, batch: Batch, micro: list[Sample],
                         step: StepTokens | None) -> tuple[torch.Tensor, dict[str, Any], int]:
        if step is None:  # evaluation: the summed main loss and the number of trained tokens
            total = head.loss_sum(output.hidden, batch.labels)
            return total, {"loss_sum": total.detach(), "tokens": batch.num_loss_tokens}, batch.num_tokens
        loss, parts = sft_loss_from_output(head, output, batch, step, self.config.train.mtp_loss_weight)
        return loss, parts, batch.num_tokens

    def stats(self, sums: dict[str, float], step: StepTokens) -> dict[str, Any]:
        stats: dict[str, Any] = {"loss": sums["loss_sum"] / step.main, "trained_tokens": step.main}
        if self.config.model.num_nextn_predict_layers:
            stats["mtp_loss"] = sums["mtp_loss_sum"] / max(sum(step.mtp), 1)
        if self.config.model.aux_loss_alpha > 0:
            stats["aux_loss"] = sums["aux_loss_weighted"]
        return stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss per trained token over the eval set, split across data-parallel ranks. Every rank runs the
        same number of forward passes (the collectives inside must match); a rank out of samples runs a filler
        micro-batch whose loss counts zero."""
        if not self.eval_items:
            return {}
        mbs = self.config.train.micro_batch_size
        mine, count = self.eval_share()
        micro = [mine[b * mbs : (b + 1) * mbs] for b in range(count)]
        filler = self.eval_items[:1]
        keys = ("loss_sum", "tokens")
        sums = torch.zeros(len(keys), dtype=torch.float64)
        model.eval()
        pipeline = self.ctx.pipeline
        if pipeline is None:
            for part in micro:
                batch = self.inputs(part or filler)
                doc_ids = batch.doc_ids if batch.multi_document else None
                with self.ctx.autocast():
                    hidden = model.hidden_states(batch.input_ids, batch.position_ids, doc_ids)
                    output = TrainOutput(hidden, [], None)
                    _, parts, _ = self.loss_from_output(model.lm_head, output, batch, part, None)
                self.accumulate(sums, parts, 1.0 if part else 0.0, keys)
        else:
            group = pipeline.n_microbatches
            micro += [[] for _ in range(-len(micro) % group)]
            for start in range(0, len(micro), group):
                chunk = micro[start : start + group]
                self.run_pipeline(model, [m or filler for m in chunk], None, sums, train=False,
                                  weights=[1.0 if m else 0.0 for m in chunk], keys=keys)
        self.ctx.collectives.dp_sum(sums)
        model.train()
        return {"eval_loss": float(sums[0] / sums[1])}
