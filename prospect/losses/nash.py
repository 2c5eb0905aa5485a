"""Nash-MD (Munos et al., 2023, Nash learning from human feedback): the policy plays against an opponent
sampled from the geometric mixture pi^(1 - mixture) * pi_ref^mixture, decoded token by token, and is paid the
preference P(y > y' | x) of its sample y over the opponent's y', centred at 1/2. Nash-MD-PG regularises with
the KL to the reference inside the reward: each sample's advantage is

    A = P(y > y') - 1/2 - beta * sum_t log pi(y_t) / pi_ref(y_t)

and the update is the policy gradient -A grad log pi(y) (PPO's clipped ratio, which is that gradient with one
update per rollout). It runs in the rollout loop (engine/nash.py), with any preference source by name
(`online.preference`, see evaluation/judges.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.losses.group import RLOOParams, group_spec, normalization, sequence_advantage_loss
from prospect.options import FRACTION, NON_NEGATIVE, opt


@dataclass
class NashParams(RLOOParams):
    beta: float = opt(
        0.1,
        "tau: weight of the sequence KL to the reference (k1, summed over tokens) taken out of each reward.",
        bounds=NON_NEGATIVE,
    )
    mixture: float = opt(
        0.5,
        "The opponent samples from pi^(1 - mixture) * pi_ref^mixture, token by token (0: self-play, 1: the "
        "reference).",
        bounds=FRACTION,
    )


def nash_md_advantages(preferences: torch.Tensor, kl: torch.Tensor | None, p: NashParams) -> torch.Tensor:
    """[prompts, G] advantages: P(y > y') - 1/2, less beta times the sample's KL to the reference."""
    centred = preferences - 0.5
    return centred - p.beta * kl if kl is not None and p.beta > 0 else centred


NASH_MD = group_spec(
    "nash_md",
    sequence_advantage_loss,
    NashParams,
    nash_md_advantages,
    loop="nash",
    follow=normalization,
    needs_reference=True,  # the opponent's mixture needs the reference whatever beta is
    summary="Nash-MD-PG: policy gradient on P(y > y') against a geometric mixture of policy and reference "
    "(Munos et al., 2023), the KL to the reference taken out of the reward.",
)
SPECS = [NASH_MD]
