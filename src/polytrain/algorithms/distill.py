"""On-policy distillation: the student samples, teachers score every sampled token, and the student moves towards
the teacher on its own distribution (reverse KL, mode-seeking).

Per completion position t with student distribution p_s and teacher p_t over the vocabulary:
  full-vocab reverse KL   KL_t = sum_v p_s(v) (log p_s(v) - log p_t(v))      (mode = "loss": minimised directly)
  sampled-token estimate  k1_t = log p_s(x_t) - log p_t(x_t)                  (mode = "advantage": A_t = -k1_t, a
  per-token policy-gradient advantage, as in on-policy distillation with a reverse-KL reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from polytrain.schema import option


@dataclass
class DistillConfig:
    teachers: list[str] = option(
        [], "Teacher run directories (their newest checkpoint), or 'name=run_dir'. Each must use the student's "
        "tokenizer and chat template (checked at start). A prompt's optional `teacher` field picks one by name "
        "(default name: the directory's basename); otherwise all teachers score it and their log-probabilities "
        "are averaged (a normalised geometric mean)."
    )
    mode: Literal["loss", "advantage"] = option(
        "loss", "loss: minimise the full-vocabulary reverse KL at every sampled position; advantage: per-token "
        "policy gradient with advantage -(log p_student - log p_teacher) of the sampled token."
    )
    group_size: int = option(1, "Completions sampled per prompt.", ge=1)
    max_new_tokens: int = option(32, "Longest completion.", ge=1)
    temperature: float = option(1.0, "Student sampling temperature.", gt=0)
    top_p: float = option(1.0, "Student nucleus sampling mass.", gt=0, le=1)


def reverse_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary KL(student || teacher) per position: [..., V] logits / log-probs -> [...] (fp32)."""
    logp = F.log_softmax(student_logits.float(), dim=-1)
    return (logp.exp() * (logp - teacher_logprobs.float())).sum(dim=-1)


def mean_teacher_logprobs(per_teacher: list[torch.Tensor]) -> torch.Tensor:
    """log of the normalised geometric mean of the teachers' distributions ([..., V] log-probs each)."""
    if len(per_teacher) == 1:
        return per_teacher[0]
    return F.log_softmax(torch.stack(per_teacher).mean(dim=0), dim=-1)
