"""Pairwise losses on the implied reward r = log pi(y|x) - log pi_ref(y|x) of a chosen and a rejected
completion: DPO and its label-smoothed (cDPO) and robust variants, IPO, and the RSO hinge.

In HALO terms the reference point of a chosen completion is the rejected one's reward, and the value
function is log sigmoid (DPO), a hinge, or a squared distance to a target margin (IPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prospect.losses.base import LossInputs, LossOutput, LossSpec, chosen_rejected, mean_of
from prospect.options import POSITIVE, Bounds, opt


@dataclass
class DPOParams:
    beta: float = opt(
        0.1, "Reward scale beta: higher keeps the policy closer to the reference.", bounds=POSITIVE
    )
    label_smoothing: float = opt(
        0.0,
        "epsilon, the assumed rate of flipped labels: conservative DPO (cDPO) when > 0.",
        bounds=Bounds(0, 0.5, high_open=True),
    )
    robust: bool = opt(False, "With label_smoothing: the unbiased robust DPO estimator (Chowdhury et al.).")
    epsilon_from_raters: bool = opt(
        False,
        "Each pair's own epsilon: the share of its raters who preferred the rejected side (raw ratings, "
        "votes or an agreement field in the data); label_smoothing for pairs without one. The robust "
        "estimator caps it at 0.45.",
    )


MAX_ROBUST_EPSILON = 0.45  # the robust estimator divides by 1 - 2 eps


@dataclass
class CDPOParams(DPOParams):
    label_smoothing: float = opt(
        0.2, "epsilon, the assumed rate of flipped labels.", bounds=Bounds(0, 0.5, high_open=True)
    )


@dataclass
class RobustDPOParams(CDPOParams):
    robust: bool = opt(True, "The unbiased robust estimator: ((1-eps) l(c,r) - eps l(r,c)) / (1 - 2 eps).")


@dataclass
class IPOParams:
    tau: float = opt(
        0.1,
        "Regularisation tau: the target margin of length-normalised log-ratios is 1/(2 tau).",
        bounds=POSITIVE,
    )


@dataclass
class HingeParams:
    beta: float = opt(
        0.1, "Reward scale beta; the loss is max(0, 1 - beta * (r_chosen - r_rejected)).", bounds=POSITIVE
    )


def implied_rewards(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return chosen_rejected(x.require("policy_logps") - x.require("reference_logps"))


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, x: LossInputs) -> dict:
    """Rewards (already scaled), their margin and accuracy, and the log-probs and lengths behind them."""
    logps_c, logps_r = chosen_rejected(x.require("policy_logps"))
    len_c, len_r = chosen_rejected(x.require("completion_lengths"))
    return {
        "rewards/chosen": mean_of(chosen),
        "rewards/rejected": mean_of(rejected),
        "rewards/margin": mean_of(chosen - rejected),
        "rewards/accuracy": mean_of((chosen > rejected).float()),
        "logps/chosen": mean_of(logps_c),
        "logps/rejected": mean_of(logps_r),
        "length/chosen": mean_of(len_c),
        "length/rejected": mean_of(len_r),
    }


def dpo_loss(x: LossInputs, p: DPOParams) -> LossOutput:
    """-log sigmoid(beta * (r_c - r_r)), with label smoothing eps:
    cDPO (1-eps) l(c,r) + eps l(r,c); robust ((1-eps) l(c,r) - eps l(r,c)) / (1 - 2 eps). eps is one number,
    or each pair's raters' share preferring the rejected side (epsilon_from_raters)."""
    r_c, r_r = implied_rewards(x)
    logits = p.beta * (r_c - r_r)
    right, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    eps: float | torch.Tensor = p.label_smoothing
    if p.epsilon_from_raters and x.agreement is not None:
        flips = (1 - x.agreement).to(logits.dtype)
        eps = torch.where(flips.isnan(), torch.full_like(flips, p.label_smoothing), flips)
        if p.robust:
            eps = eps.clamp(max=MAX_ROBUST_EPSILON)
    if p.robust:
        losses = ((1 - eps) * right - eps * flipped) / (1 - 2 * eps)
    else:
        losses = (1 - eps) * right + eps * flipped
    return LossOutput(losses, pair_metrics(p.beta * r_c, p.beta * r_r, x), {})


def ipo_loss(x: LossInputs, p: IPOParams) -> LossOutput:
    """(r_c / |y_c| - r_r / |y_r| - 1/(2 tau))^2 with length-normalised log-ratios (Azar et al.)."""
    r_c, r_r = implied_rewards(x)
    len_c, len_r = chosen_rejected(x.require("completion_lengths"))
    h = r_c / len_c - r_r / len_r
    losses = (h - 1 / (2 * p.tau)) ** 2
    return LossOutput(losses, pair_metrics(r_c / len_c, r_r / len_r, x), {})


def hinge_loss(x: LossInputs, p: HingeParams) -> LossOutput:
    """max(0, 1 - beta * (r_c - r_r)) (RSO / SLiC-HF calibration with a reference)."""
    r_c, r_r = implied_rewards(x)
    losses = torch.relu(1 - p.beta * (r_c - r_r))
    return LossOutput(losses, pair_metrics(p.beta * r_c, p.beta * r_r, x), {})


SPECS = [
    LossSpec(name=name, compute=compute, params=params, data="paired", needs_reference=True)
    for name, compute, params in (
        ("dpo", dpo_loss, DPOParams),
        ("cdpo", dpo_loss, CDPOParams),
        ("robust_dpo", dpo_loss, RobustDPOParams),
        ("ipo", ipo_loss, IPOParams),
        ("hinge", hinge_loss, HingeParams),
    )
]
