"""PPO's per-token objectives (Schulman et al., 2017), as used for RLHF (Ziegler et al.; Ouyang et al.).

Inputs are token-level tensors over completion positions: new and old log-probs, advantages, new and old
values and returns, and the action mask. Each function returns per-token losses; the caller averages them
over the action tokens of the whole minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prospect.losses.base import LossInputs, LossOutput, LossSpec, TokenInputs, masked_mean_of
from prospect.options import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, opt


@dataclass
class PPOParams:
    clip: float = opt(0.2, "Policy ratio clip epsilon.", bounds=POSITIVE)
    value_clip: float = opt(
        0.2,
        "Value clip: new values stay within this of the rollout's values (0: no clipping).",
        bounds=NON_NEGATIVE,
    )
    vf_coef: float = opt(0.1, "Weight of the value loss.", bounds=NON_NEGATIVE)
    entropy_coef: float = opt(0.0, "Weight of the entropy bonus.", bounds=NON_NEGATIVE)
    gamma: float = opt(1.0, "Discount of GAE.", bounds=FRACTION)
    lam: float = opt(0.95, "lambda of GAE.", bounds=FRACTION)
    kl_coef: float = opt(
        0.05, "Initial coefficient of the per-token KL penalty to the reference.", bounds=NON_NEGATIVE
    )
    kl_estimator: str = opt(
        "k1",
        "Per-token KL estimate: k1 = log pi/pi_ref, k3 = (r - 1) - log r with r = pi_ref/pi.",
        ("k1", "k3"),
    )
    kl_target: float = opt(
        0.0, "Adaptive KL control: target sequence KL in nats (0: fixed coefficient).", bounds=NON_NEGATIVE
    )
    kl_horizon: float = opt(10000.0, "Adaptive KL control horizon.", bounds=POSITIVE)
    ppo_epochs: int = opt(4, "Passes over each rollout batch.", bounds=AT_LEAST_ONE)
    minibatches: int = opt(2, "Minibatches per pass (each one optimizer update).", bounds=AT_LEAST_ONE)
    whiten_advantages: bool = opt(
        True, "Normalise advantages to zero mean and unit variance over the rollout."
    )
    critic: str = opt(
        "separate",
        "Value model: 'separate' (its own trunk) or 'shared' (a head on the policy's trunk).",
        ("separate", "shared"),
    )
    critic_init: str = opt(
        "reward",
        "Separate critic's initial weights: 'reward' (the reward model, as InstructGPT) or 'policy'.",
        ("reward", "policy"),
    )


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) per token with r = pi/pi_old, whether the clipped term was
    the larger one). eps_high defaults to eps; DAPO raises it ("clip-higher")."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    high = clip if clip_high is None else clip_high
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2) per token, whether clipping was the larger one)."""
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped = (old_values + torch.clamp(values - old_values, -clip, clip) - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped)


def kl_penalty(logps: torch.Tensor, reference_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on sampled tokens."""
    log_ratio = logps - reference_logps
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio  # k3: (r - 1) - log r with r = pi_ref / pi; never negative


def ppo_loss(x: LossInputs, p: PPOParams) -> LossOutput:
    """max(-A r, -A clip(r, 1 +- eps)) + vf_coef * 0.5 max((V - R)^2, (clip(V) - R)^2) - entropy_coef * H per
    action token, summed per sequence (the engine divides by the action tokens of the minibatch)."""
    g = x.require("tokens")
    mask = g.mask.to(g.logps.dtype)
    pg, pg_clipped = policy_loss(g.logps, g.old_logps, g.advantages, p.clip)
    vf, vf_clipped = value_loss(
        g.require("values"), g.require("old_values"), g.require("returns"), p.value_clip
    )
    per_token = pg + p.vf_coef * vf
    if p.entropy_coef:
        per_token = per_token - p.entropy_coef * g.require("entropy")
    metrics = policy_metrics(g, pg, pg_clipped)
    metrics["value_loss"] = masked_mean_of(vf, mask)
    metrics["value_clip_fraction"] = masked_mean_of(vf_clipped.float(), mask)
    if g.entropy is not None:
        metrics["entropy"] = masked_mean_of(g.entropy, mask)
    return LossOutput((per_token * mask).sum(-1), metrics, {})


def policy_metrics(
    g: TokenInputs, pg: torch.Tensor, clipped: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The clipped objective's per-token means: its value, how often clipping bound, and the approximate KL
    to the rollout policy, 0.5 (log pi - log pi_old)^2."""
    mask = g.mask.to(g.logps.dtype)
    log_ratio = g.logps - g.old_logps
    return {
        "policy_loss": masked_mean_of(pg, mask),
        "clip_fraction": masked_mean_of(clipped.float(), mask),
        "approx_kl": masked_mean_of(0.5 * log_ratio**2, mask),
    }


SPECS = [
    LossSpec(
        name="ppo",
        compute=ppo_loss,
        params=PPOParams,
        data="prompts",
        needs_reference=True,
        normalize="tokens",
        loop="ppo",
    )
]
