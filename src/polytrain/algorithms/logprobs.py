"""Log-probabilities of given tokens under a model: the quantity every preference and RL loss is built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytrain.data.dataset import IGNORE
from polytrain.data.packing import Batch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position [B, T] (0 where the label is IGNORE), computed in fp32."""
    safe = labels.clamp(min=0)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, safe.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == IGNORE, 0.0)


def batch_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-token log-probabilities of `batch.labels` under `model` (one sequence per row, right padding), through
    the output head's chunked path (no full-vocabulary logits tensor)."""
    hidden = model.hidden_states(batch.input_ids, position_ids=batch.position_ids, token_mask=batch.doc_ids >= 0)
    return model.lm_head.label_logprobs(hidden, batch.labels)


def sequence_logprobs(token_logp: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, number of scored tokens) per row."""
    mask = labels != IGNORE
    return token_logp.sum(dim=-1), mask.sum(dim=-1)
