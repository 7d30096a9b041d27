"""Supervised fine-tuning: next-token cross-entropy on the trained tokens, plus the model's auxiliary objectives
(multi-token prediction and the MoE sequence-wise balance loss) when it has them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytrain.data.dataset import IGNORE, Sample
from polytrain.data.packing import Batch
from polytrain.models.common.decoder import DecoderLM, TrainOutput, shift_left
from polytrain.models.common.output_head import OutputHead


def mtp_labels(batch: Batch, depth: int) -> torch.Tensor:
    """Targets of MTP depth k: position i predicts the label of position i+k, within the same document only."""
    whole_labels, whole_docs = batch.whole_rows(batch.labels), batch.whole_rows(batch.doc_ids)
    labels = shift_left(whole_labels, depth, IGNORE)
    same_doc = shift_left(whole_docs, depth, -2) == whole_docs
    return batch.local_part(labels.masked_fill(~same_doc, IGNORE))


@dataclass
class StepTokens:
    """Trained-token counts of a whole optimizer step: the exact normalisers of its mean losses."""

    main: int
    mtp: list[int]

    @classmethod
    def of(cls, samples: list[Sample], mtp_depth: int) -> StepTokens:
        main = sum(s.num_loss_tokens for s in samples)
        mtp = [sum(int((s.labels[k:] != IGNORE).sum()) for s in samples) for k in range(1, mtp_depth + 1)]
        return cls(main, mtp)


def sft_loss(
    model: DecoderLM, batch: Batch, step_tokens: StepTokens, mtp_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`sft_loss_from_output` of the model's training forward on `batch`."""
    doc_ids = batch.doc_ids if batch.multi_document else None
    out = model.forward_train(batch.input_ids, position_ids=batch.position_ids, doc_ids=doc_ids,
                              token_mask=batch.doc_ids >= 0)
    return sft_loss_from_output(model.lm_head, out, batch, step_tokens, mtp_weight)


def sft_loss_from_output(
    head: OutputHead, out: TrainOutput, batch: Batch, step_tokens: StepTokens, mtp_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss to backpropagate, detached summed parts for logging).

    Each part is normalised by its trained-token count over the whole optimizer step (all micro-batches and
    ranks), so accumulating the micro-batch gradients gives exactly the gradient of the step's mean losses:
    main CE + mtp_weight * mean over depths of the MTP CE + the balance loss (token-weighted over micro-batches).
    """
    main_sum = head.loss_sum(out.hidden, batch.labels)
    loss = main_sum / max(step_tokens.main, 1)
    parts = {"loss_sum": main_sum.detach()}
    if out.mtp_hidden:
        mtp_sum = torch.zeros((), device=main_sum.device)
        for depth, (hidden, count) in enumerate(zip(out.mtp_hidden, step_tokens.mtp), start=1):
            depth_sum = head.loss_sum(hidden, mtp_labels(batch, depth))
            loss = loss + mtp_weight / len(out.mtp_hidden) * depth_sum / max(count, 1)
            mtp_sum = mtp_sum + depth_sum.detach()
        parts["mtp_loss_sum"] = mtp_sum
    if out.aux_loss is not None:
        share = batch.row_loss_tokens / max(step_tokens.main, 1)
        loss = loss + out.aux_loss * share
        parts["aux_loss_weighted"] = out.aux_loss.detach() * share
    return loss, parts
