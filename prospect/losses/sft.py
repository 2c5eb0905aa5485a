"""Supervised fine-tuning on completions, and its conditional variant.

SFT is the HALO family's degenerate member: maximise log pi(y|x) of good completions, no reference.
CSFT (conditional SFT, Korbak et al.; a KTO-paper baseline) learns from both labels by ending the prompt
with a control token, <|good|> or <|bad|>; sampling with <|good|> asks for the desirable behaviour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prospect.losses.base import LossInputs, LossOutput, LossSpec, mean_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class SFTParams:
    pass


@dataclass(frozen=True)
class ControlTokens:
    """CSFT's control tokens: added as special tokens, ending each prompt by its label."""

    desirable: str = "<|good|>"
    undesirable: str = "<|bad|>"

    def install(self, tokenizer: Any, model: PreTrainedModel) -> dict[bool, list[int]]:
        tokenizer.add_special_tokens({"additional_special_tokens": [self.desirable, self.undesirable]})
        model.resize_token_embeddings(len(tokenizer))
        return {
            True: [tokenizer.convert_tokens_to_ids(self.desirable)],
            False: [tokenizer.convert_tokens_to_ids(self.undesirable)],
        }


def sft_loss(x: LossInputs, p: SFTParams) -> LossOutput:
    """Negative log-likelihood of each completion, summed over its tokens; the engine divides by the
    number of completion tokens in the step (token-mean NLL)."""
    nll = -x.require("policy_logps")
    metrics = {"nll/sequence": mean_of(nll), "length": mean_of(x.require("completion_lengths"))}
    return LossOutput(nll, metrics, {})


SFT = LossSpec("sft", sft_loss, SFTParams, "completions", needs_reference=False, normalize="tokens")
SPECS = [
    SFT,
    dataclasses.replace(
        SFT,
        name="csft",
        data="unpaired",
        prompt_tokens=ControlTokens(),
        summary="token-mean NLL of each completion after a <|good|> or <|bad|> control token chosen by its label",
    ),
]
