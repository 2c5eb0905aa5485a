"""What a loss is: a pure function of per-sequence log-probs, and a declaration of what it needs.

The engine reads the declaration (reference model? KL batch? unpaired or paired data?), computes the
inputs, and normalises: every loss returns per-unit losses whose sum the engine divides by the number
of units in the whole optimizer step, across microbatches and processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from prospect.config import build_section, suggest
from prospect.errors import UserError


@dataclass
class TokenInputs:
    """Token-level tensors [rows, T-1] for policy-gradient losses, aligned with next-token positions."""

    logps: torch.Tensor  # log pi(a_t | s_t) now (with gradient)
    old_logps: torch.Tensor  # at rollout time
    advantages: torch.Tensor
    values: torch.Tensor  # value estimates now (with gradient)
    old_values: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor  # action (completion) positions
    entropy: torch.Tensor | None = None


@dataclass
class LossInputs:
    """Shapes are [N] for N sequences of a microbatch. For paired data the first half of the rows are
    the chosen completions and the second half the rejected ones (see `chosen_rejected`)."""

    policy_logps: torch.Tensor | None = None  # summed completion log-probs under the policy (with gradient)
    completion_lengths: torch.Tensor | None = None  # completion tokens per sequence (float)
    reference_logps: torch.Tensor | None = None  # same, under the reference (no gradient)
    labels: torch.Tensor | None = None  # bool: desirable (True) / undesirable (False)
    kl_estimate: torch.Tensor | None = None  # scalar: mean policy/reference log-ratio on mismatched pairs
    scores: torch.Tensor | None = None  # reward models: one scalar per sequence (with gradient)
    group_index: torch.Tensor | None = None  # reward models: the ranked list of each sequence, best first
    targets: torch.Tensor | None = None  # ratings: regression targets or ranked scores (NaN: none)
    tokens: TokenInputs | None = None  # policy-gradient losses (PPO)


@dataclass
class LossOutput:
    losses: torch.Tensor  # [U] one loss per unit (example or pair; per sequence, summed over tokens, for SFT)
    means: dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count), averaged over the step
    totals: dict[str, torch.Tensor]  # metric -> value summed over the step (e.g. counts)


@dataclass(frozen=True)
class LossSpec:
    name: str
    compute: Callable[[LossInputs, Any], LossOutput]
    params: type  # dataclass of hyperparameters, each declared with `opt`
    data: str  # "unpaired" | "paired" | "completions" | "ranked" (lists, best first) | "rated" | "prompts"
    needs_reference: bool
    needs_kl_batch: bool = False
    normalize: str = "units"  # "units": mean over examples or pairs; "tokens": mean over completion tokens
    # (params, label counts) -> (params, warnings); may adjust params, raises UserError for unusable data
    check_data: Callable[[Any, dict[str, int]], tuple[Any, list[str]]] | None = None
    control_tokens: tuple[str, str] | None = None  # CSFT: (desirable, undesirable) tokens ending the prompt
    summary: str = ""  # one line for --help; defaults to the compute function's docstring
    model: str = "policy"  # "policy": the loss sees log-probs; "reward": a scalar head's scores
    loop: str = "offline"  # "offline": batches of a dataset; "ppo": rollouts from the policy (online/ppo.py)

    def describe(self) -> str:
        return self.summary or " ".join((self.compute.__doc__ or self.name).split())

    def make_params(self, values: dict[str, Any], where: str) -> Any:
        return build_section(self.params, {k: v for k, v in values.items() if k != "name"}, where)


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    import prospect.losses  # noqa: F401  (registers the built-in losses)

    if name not in LOSSES:
        raise UserError(
            f"unknown loss '{name}'{suggest(name, LOSSES)}; available: {', '.join(sorted(LOSSES))}"
        )
    return LOSSES[name]


def chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


def mean_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.detach()
    return values.sum(), torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of `values` where `mask`, detached, for step-level averaging."""
    values = values.detach()
    return (values * mask).sum(), mask.sum().to(values.dtype)
