"""Preference losses over (chosen, rejected) pairs: DPO and its family, and the Bradley-Terry reward-model loss.

Notation (per pair): LP = summed log-probability of a completion's tokens, a = LP / length, ref = the same under the
frozen reference, delta = (LP_w - ref_w) - (LP_l - ref_l). Every function returns per-pair losses; the objective
divides their sum by the number of pairs in the whole optimizer step (all ranks and micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from polytrain.schema import option

LOSSES = ("sigmoid", "ipo", "simpo", "orpo", "hinge")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "simpo", "orpo", "hinge"] = option(
        "sigmoid", "sigmoid: DPO (Rafailov et al. 2023), with label_smoothing = conservative DPO (Mitchell 2023); "
        "ipo: IPO (Azar et al. 2023) on length-averaged log-ratios, as TRL; simpo: SimPO (Meng et al. 2024), "
        "reference-free; orpo: ORPO (Hong et al. 2024), reference-free, includes its NLL term; hinge: SLiC-style."
    )
    beta: float = option(0.1, "Inverse temperature beta (TRL / OpenRLHF default 0.1; IPO's tau).", gt=0)
    label_smoothing: float = option(0.0, "cDPO: assumed probability that a preference label is flipped.", ge=0,
                                    le=0.5)
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma (TRL-CPO / LLaMA-Factory default 0.5).", ge=0)
    sft_weight: float = option(0.0, "Weight of an extra NLL term on the chosen completions (TRL loss_type "
                               "['sigmoid', 'sft']; 0 = off).", ge=0)
    reference: Literal["model", "precomputed", "none"] = option(
        "model", "Reference log-probs from a frozen copy of the starting model, from `ref_chosen_logp` / "
        "`ref_rejected_logp` fields of the data (`polytrain dpo --precompute-reference`), or none (simpo, orpo)."
    )


def dpo_losses(cfg: DPOConfig, lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
               len_w: torch.Tensor, len_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, per-pair margin whose sign says whether the pair is ranked right)."""
    beta = cfg.beta
    avg_w, avg_l = lp_w / len_w.clamp(min=1), lp_l / len_l.clamp(min=1)
    if cfg.loss == "simpo":
        margin = beta * (avg_w - avg_l) - cfg.simpo_gamma
        return -F.logsigmoid(margin), avg_w - avg_l
    if cfg.loss == "orpo":
        # log odds(y) = a - log(1 - exp(a)), computed stably with log1p(-exp(a))
        log_odds = (avg_w - avg_l) - (torch.log1p(-torch.exp(avg_w)) - torch.log1p(-torch.exp(avg_l)))
        return -avg_w - beta * F.logsigmoid(log_odds), log_odds
    delta = (lp_w - ref_w) - (lp_l - ref_l)
    if cfg.loss == "ipo":
        averaged = (lp_w - ref_w) / len_w.clamp(min=1) - (lp_l - ref_l) / len_l.clamp(min=1)
        return (averaged - 1 / (2 * beta)) ** 2, delta
    if cfg.loss == "hinge":
        return torch.relu(1 - beta * delta), delta
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta), delta


def bradley_terry_losses(reward_w: torch.Tensor, reward_l: torch.Tensor,
                         margin: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model loss -log sigmoid(r_w - r_l - margin) per pair (margin: optional per-pair target gap)."""
    gap = reward_w - reward_l
    if margin is not None:
        gap = gap - margin
    return -F.logsigmoid(gap)
