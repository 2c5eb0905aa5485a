"""The reference policy pi_ref of the implied reward beta * log(pi / pi_ref)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from prospect.data.batching import Sequences
from prospect.errors import UserError
from prospect.models.scoring import TokenScorer

ReferenceFn = Callable[[Sequences], torch.Tensor]


def resolve_reference_mode(requested: str, lora: bool) -> str:
    if requested == "auto":
        return "adapter" if lora else "copy"
    if requested == "adapter" and not lora:
        raise UserError("train.reference=adapter needs a LoRA policy (model.lora_r > 0)")
    return requested


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off, taken before training touches the policy."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def copy_reference(reference_model: nn.Module, bf16: bool, chunk: int) -> ReferenceFn:
    scorer = TokenScorer(reference_model, bf16=bf16, chunk=chunk)

    @torch.no_grad()
    def logps(seqs: Sequences) -> torch.Tensor:
        return scorer.sequence_logps(seqs)

    return logps


def adapter_reference(policy_scorer: nn.Module, peft_model: nn.Module) -> ReferenceFn:
    """The policy itself with its LoRA adapter switched off: no second copy of the weights is held."""

    @torch.no_grad()
    def logps(seqs: Sequences) -> torch.Tensor:
        with peft_model.disable_adapter():
            return policy_scorer(seqs.input_ids, seqs.attention_mask, seqs.completion_mask).sum(-1)

    return logps
