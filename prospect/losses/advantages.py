"""Advantage estimation for policy-gradient methods."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over each row's masked (action) positions:
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V. The value after
    the last action is 0 (the episode ends). Rows are [batch, T]; positions outside `mask` get 0."""
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # Positions outside the mask pass the next action's value and advantage through unchanged.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, reduce_sum=lambda t: t, shift_mean: bool = True
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; `reduce_sum` sums statistics across processes so every
    process whitens with the same global mean and variance."""
    mask = mask.to(x.dtype)
    stats = reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[1].clamp(min=1)
    var = reduce_sum(((x - mean) ** 2 * mask).sum()) / (stats[1] - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def tied(rewards: torch.Tensor) -> torch.Tensor:
    """[groups, 1]: whether every reward of a group is the same (the group carries no learning signal)."""
    return rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True)


def group_relative(rewards: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al., 2024): each sample's reward against its group's, [groups, G] -> [groups, G]:
    (r - mean_group) / (std_group + eps) with the unbiased std, or r - mean_group when not `scale` (Dr. GRPO:
    scaling favours prompts whose rewards barely differ). A group of equal rewards gives exactly 0."""
    advantages = rewards - rewards.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (rewards.std(-1, keepdim=True) + eps)
    return torch.where(tied(rewards), torch.zeros_like(rewards), advantages)


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (Kool et al., 2019; Ahmadian et al., 2024): A_i = r_i - mean_{j != i} r_j within each group,
    [groups, G] -> [groups, G], G >= 2. A group of equal rewards gives exactly 0."""
    size = rewards.shape[-1]
    if size < 2:
        raise ValueError("leave_one_out: a group needs at least 2 samples")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (size - 1)
    return torch.where(tied(rewards), torch.zeros_like(rewards), rewards - baseline)
