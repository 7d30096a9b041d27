"""Supervised fine-tuning: next-token cross-entropy on the trained tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.data.dataset import IGNORE
from polytrain.data.packing import Batch


def needs_document_mask(batch: Batch) -> bool:
    """True when some row holds more than one document (plain causal attention would leak across them)."""
    return bool((batch.doc_ids.amax(dim=1) > 0).any())


def sft_loss(model: nn.Module, batch: Batch, normalizer: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss / normalizer, summed token loss detached).

    `normalizer` is the number of trained tokens in the whole optimizer step (over all micro-batches and ranks),
    so accumulating the gradients of every micro-batch gives exactly the gradient of the step's mean token loss.
    """
    doc_ids = batch.doc_ids if needs_document_mask(batch) else None
    logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=doc_ids)
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return loss_sum / normalizer, loss_sum.detach()
