"""What a loss is: a pure function of per-sequence log-probs, and a declaration of what it needs.

The engine reads the declaration (which head? reference model? which data shape? a reference point?),
computes the inputs, and normalises: every loss returns per-unit losses whose sum the engine divides by
the number of units in the whole optimizer step, across microbatches and processes.

A method's own machinery is a hook on its declaration, so the engine calls it without knowing the method:
`reference_point` (KTO's KL estimate from mismatched pairs), `prompt_tokens` (CSFT's control tokens) and
`group_advantages` (GRPO's and RLOO's baselines). `adapt` lets the declaration follow the options (GRPO with
no KL term needs no reference model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

import torch

from prospect.data.shapes import DataShape
from prospect.data.tokenize import Encoded, TrainingItem
from prospect.options import build_section

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# What the trained module returns: per-token log-probs of a policy, or one scalar per sequence.
Head = Literal["policy", "reward"]
# What per-unit losses are averaged over in a step: examples (or pairs, lists), or completion tokens.
Normalize = Literal["units", "tokens"]
# How an engine step runs: batches of a dataset, or rollouts sampled from the policy: with a critic
# (engine/ppo.py), critic-free with advantages from each prompt's group of samples (engine/rollout.py), or
# against an opponent sampled from a mixture with the reference, paid by a preference (engine/nash.py); or
# batches of images a diffusers denoiser learns to denoise (engine/diffusion.py).
Loop = Literal["offline", "ppo", "group", "nash", "diffusion"]
# Critic-free policy gradient: each sample's advantage from the sequence rewards of its prompt's group
# [prompts, G], their sequence KL to the reference (None without one) and the loss's params.
GroupAdvantages = Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor]


@dataclass
class TokenInputs:
    """Token-level tensors [rows, T-1] for policy-gradient losses, aligned with next-token positions."""

    logps: torch.Tensor  # log pi(a_t | s_t) now (with gradient)
    old_logps: torch.Tensor  # at rollout time
    advantages: torch.Tensor
    mask: torch.Tensor  # action (completion) positions
    values: torch.Tensor | None = None  # a critic's value estimates now (with gradient)
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    reference_logps: torch.Tensor | None = None  # under the frozen reference (a KL term in the loss)
    budget: int = 0  # the most completion tokens a rollout samples (online.max_new_tokens)

    def require(self, name: TokenInput) -> torch.Tensor:
        """The token input `name`, which the rollout supplies only when the loss's options use it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"token input '{name}' was not supplied; the rollout must compute it")
        return value


# The optional tensors of `TokenInputs`, by name, for `TokenInputs.require`.
TokenInput = Literal["values", "old_values", "returns", "entropy", "reference_logps"]

# The tensor inputs of `LossInputs`, by name, for `LossInputs.require`.
TensorInput = Literal[
    "policy_logps",
    "completion_lengths",
    "reference_logps",
    "labels",
    "reference_point",
    "scores",
    "group_index",
    "targets",
    "agreement",
    "policy_errors",
    "reference_errors",
]


@dataclass
class LossInputs:
    """Shapes are [N] for N sequences of a microbatch. For paired data the first half of the rows are
    the chosen completions and the second half the rejected ones (see `chosen_rejected`)."""

    policy_logps: torch.Tensor | None = None  # summed completion log-probs under the policy (with gradient)
    completion_lengths: torch.Tensor | None = None  # completion tokens per sequence (float)
    reference_logps: torch.Tensor | None = None  # same, under the reference (no gradient)
    labels: torch.Tensor | None = None  # bool: desirable (True) / undesirable (False)
    reference_point: torch.Tensor | None = (
        None  # scalar from the spec's ReferencePoint (KTO: the KL estimate)
    )
    scores: torch.Tensor | None = None  # reward models: one scalar per sequence (with gradient)
    group_index: torch.Tensor | None = None  # ranked lists: the list of each sequence, best first
    targets: torch.Tensor | None = None  # ratings: regression targets or ranked scores (NaN: none)
    tokens: TokenInputs | None = None  # policy-gradient losses (PPO, GRPO, RLOO)
    # [units]: the share of raters agreeing with each example's label or preferring each pair's chosen side,
    # where the data tells it (NaN: unknown); None when no unit has one.
    agreement: torch.Tensor | None = None
    # Denoisers: each image's denoising error (mean squared error of the predicted noise) under the policy
    # (with gradient) and the reference; for pairs, chosen rows first, as for log-probs.
    policy_errors: torch.Tensor | None = None
    reference_errors: torch.Tensor | None = None

    @overload
    def require(self, name: TensorInput) -> torch.Tensor: ...
    @overload
    def require(self, name: Literal["tokens"]) -> TokenInputs: ...
    def require(self, name: TensorInput | Literal["tokens"]) -> torch.Tensor | TokenInputs:
        """The input `name`, which a loss reads only when its spec makes the engine supply it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"loss input '{name}' was not supplied; the LossSpec must declare it")
        return value


@dataclass
class LossOutput:
    losses: torch.Tensor  # [U] one loss per unit (example or pair; per sequence, summed over tokens, for SFT)
    means: dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count), averaged over the step
    totals: dict[str, torch.Tensor]  # metric -> value summed over the step (e.g. counts)


class ReferencePoint(Protocol):
    """A HALO's reference point, estimated from extra sequences of each microbatch with no gradient.

    The engine builds `sequences(items, fit)` next to each microbatch, runs the policy and the reference on
    them, and passes `estimate(log_ratios, reduce_sum)` to the loss as `LossInputs.reference_point`. The
    estimate is logged under `metric`. The attributes are read-only, so a frozen dataclass implements it."""

    @property
    def metric(self) -> str: ...
    @property
    def summary(self) -> str: ...  # for `prospect options`: what the point is estimated on
    @property
    def min_batch_size(self) -> int: ...  # microbatches smaller than this cannot form the extra sequences
    @property
    def why(self) -> str: ...  # for the error when the batch is too small: "pairs each prompt with ..."

    def sequences(self, items: list[TrainingItem], fit: Callable[[Encoded], Encoded]) -> list[Encoded]: ...

    def estimate(
        self, log_ratios: torch.Tensor, reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor: ...


class PromptTokens(Protocol):
    """Special tokens that end each prompt according to its label (CSFT's <|good|> and <|bad|>)."""

    def install(self, tokenizer: Any, model: PreTrainedModel) -> dict[bool, list[int]]:
        """Add the tokens to the tokenizer and the model's embeddings; return their ids by label. Held-out
        sampling asks for the desirable behaviour with the `True` ids."""
        ...


@dataclass(frozen=True)
class LossSpec:
    name: str
    compute: Callable[[LossInputs, Any], LossOutput]
    params: type  # dataclass of hyperparameters, each declared with `opt`
    data: DataShape
    needs_reference: bool
    normalize: Normalize = "units"
    # (params, label counts) -> (params, warnings); may adjust params, raises UserError for unusable data
    check_data: Callable[[Any, dict[str, int]], tuple[Any, list[str]]] | None = None
    reference_point: ReferencePoint | None = None
    prompt_tokens: PromptTokens | None = None
    summary: str = ""  # one line for --help; defaults to the compute function's docstring
    model: Head = "policy"
    loop: Loop = "offline"
    group_advantages: GroupAdvantages | None = None  # loop "group": the method's advantages
    # params -> declaration fields that depend on them (a KL coefficient of 0 needs no reference)
    adapt: Callable[[Any], dict[str, Any]] | None = None

    def resolved(self, params: Any) -> LossSpec:
        """The declaration for these params."""
        return dataclasses.replace(self, **self.adapt(params)) if self.adapt else self

    def describe(self) -> str:
        return self.summary or " ".join((self.compute.__doc__ or self.name).split())

    def make_params(self, values: dict[str, Any], where: str) -> Any:
        return build_section(self.params, {k: v for k, v in values.items() if k != "name"}, where)


def chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


def mean_of(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = values.detach()
    return values.sum(), torch.tensor(float(values.numel()), dtype=values.dtype, device=values.device)


def masked_mean_of(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of `values` where `mask`, detached, for step-level averaging."""
    values = values.detach()
    return (values * mask).sum(), mask.sum().to(values.dtype)
