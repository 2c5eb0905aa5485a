"""Critic-free policy gradient with a baseline from each prompt's group of samples: GRPO (Shao et al., 2024)
and RLOO (Ahmadian et al., 2024). They run in the engine's rollout loop (engine/rollout.py).

Each prompt is sampled G times (`online.samples_per_prompt`). The sequence rewards of a prompt's G samples
give each sample its advantage (`group_advantages`, from losses/advantages.py), which all its completion
tokens share. The loss is PPO's clipped ratio per token; with one update per rollout the ratio is 1 and the
gradient is REINFORCE's, -A grad log pi. GRPO adds beta times the k3 KL to the reference per token; RLOO
takes the KL out of the reward instead. `loss_type` says how token losses are aggregated (see LOSS_TYPES).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prospect.losses.advantages import group_relative, leave_one_out
from prospect.losses.base import Loop, LossInputs, LossOutput, LossSpec, TokenInputs, masked_mean_of
from prospect.losses.ppo import kl_penalty, policy_loss, policy_metrics
from prospect.options import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, opt

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "sum")
LOSS_TYPE_HELP = (
    "Aggregation of the token losses: 'grpo' mean over each completion's tokens, then over completions; "
    "'dapo' (or 'bnpo': the same here) mean over every completion token of the step on all processes; "
    "'dr_grpo' each completion's sum over online.max_new_tokens, mean over completions; 'sum' each "
    "completion's sum, mean over completions (REINFORCE on sequence log-probs)."
)


@dataclass
class GroupParams:
    clip: float = opt(0.2, "Ratio clip epsilon: the ratio is kept above 1 - clip.", bounds=POSITIVE)
    clip_high: float | None = opt(
        None,
        "Upper clip epsilon: the ratio is kept below 1 + clip_high (DAPO: 0.28); unset: clip.",
        bounds=POSITIVE,
    )
    epochs: int = opt(
        1, "Passes over each rollout (TRL's num_iterations); with 1 the ratio stays 1.", bounds=AT_LEAST_ONE
    )
    minibatches: int = opt(1, "Minibatches per pass, each one optimizer update.", bounds=AT_LEAST_ONE)


@dataclass
class GRPOParams(GroupParams):
    beta: float = opt(
        0.0,
        "Weight of the per-token k3 KL to the reference in the loss (0: no reference model is loaded).",
        bounds=NON_NEGATIVE,
    )
    scale_rewards: str = opt(
        "group",
        "Advantage (r - mean_group) divided by the group's std + 1e-4 ('group'), or not ('none', Dr. GRPO).",
        ("group", "none"),
    )
    loss_type: str = opt("dapo", LOSS_TYPE_HELP, LOSS_TYPES)


@dataclass
class RLOOParams(GroupParams):
    beta: float = opt(
        0.05,
        "Weight of the sequence KL to the reference (k1, summed over tokens) taken out of each reward before "
        "the baseline (0: no reference model is loaded).",
        bounds=NON_NEGATIVE,
    )
    loss_type: str = opt("sum", LOSS_TYPE_HELP, LOSS_TYPES)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, budget: int) -> torch.Tensor:
    """One loss per completion, [rows, T] -> [rows]; the engine divides their sum by the step's completion
    tokens for 'dapo'/'bnpo' (see `adapt`) and by its completions otherwise."""
    summed = (per_token * mask).sum(-1)
    if loss_type == "grpo":
        return summed / mask.sum(-1).clamp(min=1)
    if loss_type == "dr_grpo":
        if budget <= 0:
            raise ValueError("loss_type dr_grpo: the token budget (online.max_new_tokens) was not supplied")
        return summed / budget
    return summed


def clipped(
    g: TokenInputs, p: GroupParams
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The clipped ratio objective per token, and its metrics."""
    pg, bound = policy_loss(g.logps, g.old_logps, g.advantages, p.clip, p.clip_high)
    return pg, policy_metrics(g, pg, bound)


def grpo_loss(x: LossInputs, p: GRPOParams) -> LossOutput:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + beta * k3(pi, pi_ref) per completion token, A the
    sample's reward normalised within its prompt's group, aggregated by loss_type."""
    g = x.require("tokens")
    mask = g.mask.to(g.logps.dtype)
    per_token, metrics = clipped(g, p)
    if p.beta > 0:
        kl = kl_penalty(g.logps, g.require("reference_logps"), "k3")
        per_token = per_token + p.beta * kl
        metrics["kl_k3"] = masked_mean_of(kl, mask)
    return LossOutput(aggregate(per_token, mask, p.loss_type, g.budget), metrics, {})


def sequence_advantage_loss(x: LossInputs, p: RLOOParams) -> LossOutput:
    """max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) per completion token, A the sample's advantage (its
    method's baseline and KL already taken out of its reward), aggregated by loss_type."""
    g = x.require("tokens")
    per_token, metrics = clipped(g, p)
    return LossOutput(aggregate(per_token, g.mask.to(g.logps.dtype), p.loss_type, g.budget), metrics, {})


def grpo_advantages(scores: torch.Tensor, kl: torch.Tensor | None, p: GRPOParams) -> torch.Tensor:
    return group_relative(scores, scale=p.scale_rewards == "group")


def rloo_advantages(scores: torch.Tensor, kl: torch.Tensor | None, p: RLOOParams) -> torch.Tensor:
    return leave_one_out(scores - p.beta * kl if kl is not None and p.beta > 0 else scores)


def normalization(p: Any) -> dict[str, Any]:
    """'dapo'/'bnpo' average over the step's completion tokens, the others over its completions."""
    return {"normalize": "tokens" if p.loss_type in ("dapo", "bnpo") else "units"}


def adapt(p: Any) -> dict[str, Any]:
    """A KL coefficient of 0 needs no reference model; the loss type sets the normalisation."""
    return {"needs_reference": p.beta > 0, **normalization(p)}


def group_spec(
    name: str,
    compute: Any,
    params: type,
    advantages: Any,
    loop: Loop = "group",
    follow: Callable[[Any], dict[str, Any]] = adapt,
    **declared: Any,
) -> LossSpec:
    """A critic-free method of the rollout loop, declared as its default options need it (`follow`: the
    declaration fields that depend on the options)."""
    return LossSpec(
        name,
        compute,
        params,
        "prompts",
        loop=loop,
        group_advantages=advantages,
        adapt=follow,
        **{**follow(params()), **declared},
    )


SPECS = [
    group_spec("grpo", grpo_loss, GRPOParams, grpo_advantages),
    group_spec(
        "rloo",
        sequence_advantage_loss,
        RLOOParams,
        rloo_advantages,
        summary="max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) per completion token, A = r_i - mean_{j != i} "
        "r_j over the other samples of the prompt (rewards net of beta * KL), aggregated by loss_type.",
    ),
]
