"""Pairwise losses without a reference model: SimPO, ORPO and SLiC.

They replace log pi / pi_ref by the policy's own (often length-normalised) log-probability, so no
reference forward passes are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prospect.losses.base import LossInputs, LossOutput, LossSpec, chosen_rejected, mean_of
from prospect.losses.pairwise import pair_metrics
from prospect.options import NON_NEGATIVE, POSITIVE, opt


@dataclass
class SimPOParams:
    beta: float = opt(
        2.0, "Reward scale beta on the average log-prob (the paper uses 2 to 2.5).", bounds=POSITIVE
    )
    gamma: float = opt(1.0, "Target reward margin gamma (the paper uses 0.5 to 1.6).")


@dataclass
class ORPOParams:
    lam: float = opt(
        0.1, "lambda, the weight of the odds-ratio term added to the chosen NLL.", bounds=NON_NEGATIVE
    )


@dataclass
class SLiCParams:
    delta: float = opt(1.0, "Calibration margin delta on summed log-probs.", bounds=NON_NEGATIVE)
    lam: float = opt(
        0.1,
        "lambda, the weight of the NLL regulariser on the chosen completion (0: none).",
        bounds=NON_NEGATIVE,
    )


def average_logps(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return chosen_rejected(x.require("policy_logps") / x.require("completion_lengths"))


def simpo_loss(x: LossInputs, p: SimPOParams) -> LossOutput:
    """-log sigmoid(beta * (avg log pi(y_c) - avg log pi(y_r)) - gamma) (Meng et al., 2024)."""
    avg_c, avg_r = average_logps(x)
    losses = -F.logsigmoid(p.beta * (avg_c - avg_r) - p.gamma)
    return LossOutput(losses, pair_metrics(p.beta * avg_c, p.beta * avg_r, x), {})


def orpo_loss(x: LossInputs, p: ORPOParams) -> LossOutput:
    """NLL(y_c) - lambda * log sigmoid(log odds(y_c) - log odds(y_r)), where odds(y) = P/(1-P) of the
    average token probability P = exp(avg log pi(y)) (Hong et al., 2024). The NLL is the chosen
    completion's mean token NLL."""
    avg_c, avg_r = average_logps(x)
    # log odds = log P - log(1 - P), with log(1 - exp(a)) computed stably for a < 0.
    log_odds = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
    ratio = log_odds(avg_c) - log_odds(avg_r)
    odds_term = -F.logsigmoid(ratio)
    losses = -avg_c + p.lam * odds_term
    metrics = pair_metrics(p.lam * avg_c, p.lam * avg_r, x)
    metrics["nll/chosen"] = mean_of(-avg_c)
    metrics["log_odds_ratio"] = mean_of(ratio)
    return LossOutput(losses, metrics, {})


def slic_loss(x: LossInputs, p: SLiCParams) -> LossOutput:
    """max(0, delta - log pi(y_c) + log pi(y_r)) + lambda * (-log pi(y_c)) on summed log-probs (Zhao et al.)."""
    logps_c, logps_r = chosen_rejected(x.require("policy_logps"))
    losses = torch.relu(p.delta - logps_c + logps_r) - p.lam * logps_c
    return LossOutput(losses, pair_metrics(logps_c, logps_r, x), {})


SPECS = [
    LossSpec(name=name, compute=compute, params=params, data="paired", needs_reference=False)
    for name, compute, params in (
        ("simpo", simpo_loss, SimPOParams),
        ("orpo", orpo_loss, ORPOParams),
        ("slic", slic_loss, SLiCParams),
    )
]
