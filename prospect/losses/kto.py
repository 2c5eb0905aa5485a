"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024).

The implied reward r = log pi(y|x) - log pi_ref(y|x) is compared with a reference point z, the policy's
KL to the reference estimated on mismatched pairs of the same microbatch (computed by the engine with no
gradient, averaged over all processes), clamped at 0. A desirable y loses lambda_D * (1 - sigmoid(beta * (r - z)));
an undesirable y loses lambda_U * (1 - sigmoid(beta * (z - r))).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from prospect.config import opt
from prospect.errors import UserError
from prospect.losses.base import LossInputs, LossOutput, LossSpec, masked_mean, register

# The paper's rule for imbalanced data: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
BALANCE_RANGE = (1.0, 4.0 / 3.0)


@dataclass
class KTOParams:
    beta: float = opt(0.1, "Reward scale beta: higher keeps the policy closer to the reference.")
    desirable_weight: float = opt(1.0, "lambda_D, the weight of desirable examples.")
    undesirable_weight: float = opt(1.0, "lambda_U, the weight of undesirable examples.")
    auto_weights: bool = opt(
        False,
        "Set desirable_weight from the label counts so lambda_D * n_D / (lambda_U * n_U) = 1 (the paper's rule).",
    )


def kto_loss(x: LossInputs, p: KTOParams) -> LossOutput:
    """lambda_D (1 - sigmoid(beta (r - z))) if desirable, lambda_U (1 - sigmoid(beta (z - r))) if not, where z is
    the clamped KL estimate from mismatched pairs (Ethayarajh et al., 2024)."""
    rewards = x.policy_logps - x.reference_logps
    z = x.kl_estimate.clamp(min=0).detach()
    desirable = x.labels
    loss_d = p.desirable_weight * (1 - torch.sigmoid(p.beta * (rewards - z)))
    loss_u = p.undesirable_weight * (1 - torch.sigmoid(p.beta * (z - rewards)))
    losses = torch.where(desirable, loss_d, loss_u)
    undesirable = ~desirable
    return LossOutput(
        losses=losses,
        means={
            "rewards/desirable": masked_mean(p.beta * rewards, desirable),
            "rewards/undesirable": masked_mean(p.beta * rewards, undesirable),
            "logps/desirable": masked_mean(x.policy_logps, desirable),
            "logps/undesirable": masked_mean(x.policy_logps, undesirable),
        },
        totals={
            "count/desirable": desirable.sum().float(),
            "count/undesirable": undesirable.sum().float(),
        },
    )


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


KTO = register(
    LossSpec(
        name="kto",
        compute=kto_loss,
        params=KTOParams,
        data="unpaired",
        needs_reference=True,
        needs_kl_batch=True,
        check_data=check_balance,
    )
)
