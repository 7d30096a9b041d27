"""Eval loss: mean loss per trained token over the eval set, split across data-parallel ranks.

Every rank runs the same number of forward passes (the collectives inside must match); a rank out of samples runs
a filler batch whose loss counts zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from polytrain.algorithms.sft import needs_document_mask, token_loss_sum
from polytrain.data.dataset import IGNORE, Sample
from polytrain.parallel.runtime import ParallelRuntime
from polytrain.train.batches import BatchMaker


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: list[Sample], runtime: ParallelRuntime, batches: BatchMaker,
             micro_batch_size: int, max_batches: int, autocast: Callable) -> float:
    model.eval()
    mine = samples[runtime.dp_rank :: runtime.dp_size]
    count = math.ceil(math.ceil(len(samples) / runtime.dp_size) / micro_batch_size)
    if max_batches:
        count = min(count, max_batches)
    micro = [mine[b * micro_batch_size : (b + 1) * micro_batch_size] for b in range(count)]
    totals = torch.zeros(2, dtype=torch.float64)
    if runtime.pipeline is None:
        for part in micro:
            batch = batches.micro(part or samples[:1])
            doc_ids = batch.doc_ids if needs_document_mask(batch) else None
            weight = 1.0 if part else 0.0
            with autocast():
                hidden = model.hidden_states(batch.input_ids, batch.position_ids, doc_ids)
                totals[0] += weight * float(token_loss_sum(model, hidden, batch.labels))
            totals[1] += weight * batch.num_loss_tokens
    else:
        group = runtime.pipeline.n_microbatches
        micro += [[] for _ in range(-len(micro) % group)]
        for start in range(0, len(micro), group):
            chunk = micro[start : start + group]
            batch = batches.pipeline([m or samples[:1] for m in chunk])
            for i, part in enumerate(chunk):
                if not part:  # filler: its labels are ignored, so it adds no loss
                    batch.labels[i * micro_batch_size : (i + 1) * micro_batch_size] = IGNORE
            with autocast():
                totals[0] += runtime.pipeline.eval_step(batch)
            totals[1] += batch.num_loss_tokens
        runtime.pp_sum(totals[:1])
    runtime.dp_sum(totals)
    model.train()
    return float(totals[0] / totals[1])
