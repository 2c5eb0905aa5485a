"""Supervised fine-tuning on completions, and its conditional variant.

SFT is the HALO family's degenerate member: maximise log pi(y|x) of good completions, no reference.
CSFT (conditional SFT, Korbak et al.; a KTO-paper baseline) learns from both labels by ending the prompt
with a control token, <|good|> or <|bad|>; sampling with <|good|> asks for the desirable behaviour.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from prospect.losses.base import LossInputs, LossOutput, LossSpec, mean_of, register

CONTROL_TOKENS = ("<|good|>", "<|bad|>")


@dataclass
class SFTParams:
    pass


def sft_loss(x: LossInputs, p: SFTParams) -> LossOutput:
    """Negative log-likelihood of each completion, summed over its tokens; the engine divides by the
    number of completion tokens in the step (token-mean NLL)."""
    nll = -x.policy_logps
    return LossOutput(nll, {"nll/sequence": mean_of(nll), "length": mean_of(x.completion_lengths)}, {})


CSFT_SUMMARY = (
    "token-mean NLL of each completion after a <|good|> or <|bad|> control token chosen by its label"
)
for name, data, tokens, summary in (
    ("sft", "completions", None, ""),
    ("csft", "unpaired", CONTROL_TOKENS, CSFT_SUMMARY),
):
    spec = LossSpec(name, sft_loss, SFTParams, data, needs_reference=False, normalize="tokens")
    register(dataclasses.replace(spec, control_tokens=tokens, summary=summary))
