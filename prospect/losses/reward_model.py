"""Reward-model losses on scalar scores s(x, y) (the classic RLHF pipeline's second stage), and the pairwise
preference model's on s(x, y, y').

Comparisons come as ranked lists, best first; a pair is a list of two. A list of K completions gives its
K-choose-2 comparisons in one batch, each weighted 1/C(K,2) so every prompt counts once (InstructGPT).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prospect.losses.base import LossInputs, LossOutput, LossSpec, mean_of
from prospect.options import NON_NEGATIVE, opt


@dataclass
class BTParams:
    margin_scale: float = opt(
        0.0,
        "Llama 2 margin: subtract margin_scale * (score gap or margin label) inside the sigmoid (0: plain BT).",
    )
    center: float = opt(
        0.0,
        "Reward centering eta: add eta * (s_better + s_worse)^2, keeping scores near 0.",
        bounds=NON_NEGATIVE,
    )


@dataclass
class MarginParams(BTParams):
    margin_scale: float = opt(1.0, "m = margin_scale * (rating gap): -log sigmoid(s_c - s_r - m) (Llama 2).")


@dataclass
class RegressionParams:
    pass


@dataclass
class PreferenceParams:
    pass


def comparisons(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, worse) row indices of every pair within a list; rows of a list are stored best first."""
    n = group_index.numel()
    better, worse = torch.triu_indices(n, n, offset=1, device=group_index.device)
    same = group_index[better] == group_index[worse]
    return better[same], worse[same]


def bradley_terry_loss(x: LossInputs, p: BTParams) -> LossOutput:
    """Per list: the mean over its (better, worse) pairs of -log sigmoid(s_b - s_w - m) + eta (s_b + s_w)^2,
    with m = margin_scale * (t_b - t_w) when the completions carry scores, else 0."""
    group_index, scores = x.require("group_index"), x.require("scores")
    better, worse = comparisons(group_index)
    s_b, s_w = scores[better], scores[worse]
    gap = (x.targets[better] - x.targets[worse]).nan_to_num(0.0) if x.targets is not None else 0.0
    per_pair = -F.logsigmoid(s_b - s_w - p.margin_scale * gap) + p.center * (s_b + s_w) ** 2
    groups = int(group_index.max()) + 1
    pair_group = group_index[better]
    counts = torch.zeros(groups, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, pair_group, torch.ones_like(per_pair)
    )
    losses = torch.zeros(groups, dtype=per_pair.dtype, device=per_pair.device).index_add(
        0, pair_group, per_pair
    )
    metrics = {
        "accuracy": mean_of((s_b > s_w).float()),
        "margin": mean_of(s_b - s_w),
        "score": mean_of(scores),
        "score_sq": mean_of(scores**2),
    }
    return LossOutput(losses / counts, metrics, {"comparisons": torch.tensor(float(better.numel()))})


def regression_loss(x: LossInputs, p: RegressionParams) -> LossOutput:
    """(s - rating)^2: the score regresses on the (mean) human rating."""
    scores, targets = x.require("scores"), x.require("targets")
    error = scores - targets
    metrics = {"mse": mean_of(error**2), "score": mean_of(scores), "target": mean_of(targets)}
    return LossOutput(error**2, metrics, {})


def preference_loss(x: LossInputs, p: PreferenceParams) -> LossOutput:
    """A pairwise preference model (Munos et al., 2023, Nash learning from human feedback): its score s on
    (prompt, both completions) is the logit of P(first preferred); -log sigmoid(s) when the first was
    preferred, -log sigmoid(-s) when not. The data shape 'duels' gives every pair in both orders."""
    scores, labels = x.require("scores"), x.require("labels")
    losses = F.binary_cross_entropy_with_logits(scores, labels.to(scores.dtype), reduction="none")
    metrics = {
        "accuracy": mean_of(((scores > 0) == labels).float()),
        "p_first": mean_of(torch.sigmoid(scores)),
        "score": mean_of(scores),
    }
    return LossOutput(losses, metrics, {})


REWARD_BT = LossSpec(
    "reward_bt", bradley_terry_loss, BTParams, "ranked", needs_reference=False, model="reward"
)
SPECS = [
    REWARD_BT,
    dataclasses.replace(REWARD_BT, name="reward_margin", params=MarginParams),
    dataclasses.replace(
        REWARD_BT, name="reward_regression", compute=regression_loss, params=RegressionParams, data="rated"
    ),
    dataclasses.replace(
        REWARD_BT, name="preference", compute=preference_loss, params=PreferenceParams, data="duels"
    ),
]
