"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024), and two HALO variants of it.

The implied reward r = log pi(y|x) - log pi_ref(y|x) is compared with a reference point z, the policy's
KL to the reference estimated on mismatched pairs of the same microbatch (`MismatchedPairsKL`: computed by
the engine with no gradient, averaged over all processes), clamped at 0. A desirable y loses
lambda_D * (1 - sigmoid(beta * (r - z))); an undesirable y loses lambda_U * (1 - sigmoid(beta * (z - r))).

Variants from the authors' code (ContextualAI/HALOs):
- `kto_zero`: the reference point stays 0, where it is when policy = reference (no KL batch). An ablation
  that shows what the KL term is for; the authors do not recommend it in practice.
- `kto_logsigmoid`: the same reference point, with -log sigmoid as the value function instead of 1 - sigmoid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prospect.data.tokenize import Encoded, TrainingItem, all_instances
from prospect.errors import UserError
from prospect.losses.base import LossInputs, LossOutput, LossSpec, masked_mean_of
from prospect.options import POSITIVE, opt

# The paper's rule for imbalanced data: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
BALANCE_RANGE = (1.0, 4.0 / 3.0)


@dataclass
class KTOParams:
    beta: float = opt(
        0.1, "Reward scale beta: higher keeps the policy closer to the reference.", bounds=POSITIVE
    )
    desirable_weight: float = opt(1.0, "lambda_D, the weight of desirable examples.", bounds=POSITIVE)
    undesirable_weight: float = opt(1.0, "lambda_U, the weight of undesirable examples.", bounds=POSITIVE)
    auto_weights: bool = opt(
        False,
        "Set desirable_weight from the label counts so lambda_D * n_D / (lambda_U * n_U) = 1 (the paper's rule).",
    )
    agreement_weights: bool = opt(
        False,
        "Weight each example's loss by its raters' agreement with its label (the share of raters on its "
        "side, where the data tells it; 1 elsewhere): examples people disagree on count less.",
    )


@dataclass(frozen=True)
class MismatchedPairsKL:
    """KTO's reference point: mean log pi/pi_ref over the pairs (x_i, y_(i+1 mod n)) of a microbatch, summed
    and counted across processes. Estimated per microbatch, not over the accumulated step (TRL #2153)."""

    # The raw estimate, as measured: mismatched completions are not samples of the policy, so it can be negative.
    metric: str = "kl_estimate_raw"
    summary: str = "KL batch of mismatched pairs"
    min_batch_size: int = 2
    why: str = "pairs each prompt with another example's completion for its KL estimate"

    def sequences(self, items: list[TrainingItem], fit: Callable[[Encoded], Encoded]) -> list[Encoded]:
        if not all_instances(items, Encoded):
            raise ValueError("mismatched pairs need one completion per item (unpaired data)")
        n = len(items)
        return [
            fit(Encoded(items[i].prompt_ids, items[(i + 1) % n].completion_ids, None, "")) for i in range(n)
        ]

    def estimate(
        self, log_ratios: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        count = torch.tensor(float(log_ratios.numel()), device=log_ratios.device)
        total = reduce_sum(torch.stack([log_ratios.sum(), count]))
        return (total[0] / total[1]).detach()


def prospect_loss(
    x: LossInputs, p: KTOParams, z: torch.Tensor, value: Callable[[torch.Tensor], torch.Tensor]
) -> LossOutput:
    """lambda * value(beta (r - z)) for desirable examples, lambda * value(beta (z - r)) for undesirable ones,
    with the metrics every KTO variant logs."""
    logps = x.require("policy_logps")
    rewards = logps - x.require("reference_logps")
    desirable = x.require("labels")
    loss_d = p.desirable_weight * value(p.beta * (rewards - z))
    loss_u = p.undesirable_weight * value(p.beta * (z - rewards))
    losses = torch.where(desirable, loss_d, loss_u)
    if p.agreement_weights and x.agreement is not None:
        losses = losses * x.agreement.nan_to_num(1.0).to(losses.dtype)
    undesirable = ~desirable
    means = {
        "rewards/desirable": masked_mean_of(p.beta * rewards, desirable),
        "rewards/undesirable": masked_mean_of(p.beta * rewards, undesirable),
        "logps/desirable": masked_mean_of(logps, desirable),
        "logps/undesirable": masked_mean_of(logps, undesirable),
    }
    if x.reference_point is not None:  # the z the rewards were measured against: the estimate clamped at 0
        means["reference_point"] = (z.detach().float(), torch.ones((), device=z.device))
    return LossOutput(
        losses=losses,
        means=means,
        totals={
            "count/desirable": desirable.sum().float(),
            "count/undesirable": undesirable.sum().float(),
        },
    )


def one_minus_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return 1 - torch.sigmoid(v)


def neg_logsigmoid(v: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(v)


def kto_loss(x: LossInputs, p: KTOParams) -> LossOutput:
    """lambda_D (1 - sigmoid(beta (r - z))) if desirable, lambda_U (1 - sigmoid(beta (z - r))) if not, where z is
    the clamped KL estimate from mismatched pairs (Ethayarajh et al., 2024)."""
    return prospect_loss(x, p, x.require("reference_point").clamp(min=0).detach(), one_minus_sigmoid)


def kto_zero_loss(x: LossInputs, p: KTOParams) -> LossOutput:
    """KTO with the reference point held at 0: lambda_D (1 - sigmoid(beta r)) if desirable, lambda_U (1 -
    sigmoid(-beta r)) if not (an ablation of the KL term; HALOs' KTOZeroTrainer)."""
    return prospect_loss(x, p, torch.zeros((), device=x.require("policy_logps").device), one_minus_sigmoid)


def kto_logsigmoid_loss(x: LossInputs, p: KTOParams) -> LossOutput:
    """-lambda_D log sigmoid(beta (r - z)) if desirable, -lambda_U log sigmoid(beta (z - r)) if not, with KTO's
    clamped KL reference point z (HALOs' KTOLogSigmoidTrainer)."""
    return prospect_loss(x, p, x.require("reference_point").clamp(min=0).detach(), neg_logsigmoid)


def check_balance(p: KTOParams, counts: dict[str, int]) -> tuple[KTOParams, list[str]]:
    n_d, n_u = counts.get("desirable", 0), counts.get("undesirable", 0)
    for name, n in (("desirable", n_d), ("undesirable", n_u)):
        if n == 0:
            raise UserError(
                f"KTO needs both desirable and undesirable examples; the training data has no {name} ones "
                f"({n_d} desirable, {n_u} undesirable)"
            )
    if p.auto_weights:
        p = dataclasses.replace(p, desirable_weight=p.undesirable_weight * n_u / n_d)
        return p, [
            f"KTO weights from the counts ({n_d} desirable, {n_u} undesirable): "
            f"desirable_weight={p.desirable_weight:.4g}, undesirable_weight={p.undesirable_weight:.4g}"
        ]
    ratio = p.desirable_weight * n_d / (p.undesirable_weight * n_u)
    low, high = BALANCE_RANGE
    if low <= ratio <= high:
        return p, []
    target = low if ratio < low else high
    fix_d = target * p.undesirable_weight * n_u / n_d
    fix_u = p.desirable_weight * n_d / (target * n_u)
    return p, [
        f"KTO balance lambda_D*n_D/(lambda_U*n_U) = {p.desirable_weight:g}*{n_d}/({p.undesirable_weight:g}*{n_u}) "
        f"= {ratio:.3f}, outside the paper's [1, 4/3]; set loss.desirable_weight={fix_d:.3g} "
        f"or loss.undesirable_weight={fix_u:.3g} (or loss.auto_weights=true)"
    ]


KTO = LossSpec(
    name="kto",
    compute=kto_loss,
    params=KTOParams,
    data="unpaired",
    needs_reference=True,
    reference_point=MismatchedPairsKL(),
    check_data=check_balance,
)
SPECS = [
    KTO,
    dataclasses.replace(KTO, name="kto_zero", compute=kto_zero_loss, reference_point=None),
    dataclasses.replace(KTO, name="kto_logsigmoid", compute=kto_logsigmoid_loss),
]
