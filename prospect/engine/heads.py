"""What the trained module computes for a loss, chosen by `LossSpec.model`: one object per head, so the loop
never asks which kind of model it trains.

- `PolicyHead`: a causal LM; the loss sees summed completion log-probs (and the reference's).
- `RewardHead`: a sequence classifier with one output; the loss sees one score per sequence.

Each says how to load the model, what LoRA task it is, which module accelerate wraps, how a batch becomes
`LossInputs`, and how the model is evaluated on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prospect.config import Config, ModelConfig
from prospect.data.batching import Batch
from prospect.data.tokenize import Encoder
from prospect.evaluation.heldout import PolicyEvaluation
from prospect.evaluation.reward_model import RewardModelEvaluation
from prospect.losses.base import LossInputs, LossSpec
from prospect.models.attention import unwrapped
from prospect.models.loading import load_model
from prospect.models.scalar_head import ScalarScorer, last_token_positions, load_reward_model
from prospect.models.scoring import TokenScorer


class Evaluation(Protocol):
    result_type: type

    def __call__(self, scorer: Any, reference: Any, when: str) -> Any: ...

    def report(self, before: Any, after: Any, path: Any) -> None: ...


@dataclass
class RunContext:
    """What a head needs from the run to build its evaluation."""

    encoder: Encoder
    tokenizer: Any
    items: list
    device: torch.device
    bf16: bool
    prompt_suffix: list[int] | None
    is_main: bool


class PolicyHead:
    lora_task_type = "CAUSAL_LM"
    samples_for_evaluation = True  # held-out evaluation samples from the model (its KL needs a reference)

    def load(self, cfg: ModelConfig) -> tuple[nn.Module, Any]:
        return load_model(cfg)

    def scorer(self, model: nn.Module, bf16: bool, chunk: int) -> nn.Module:
        return TokenScorer(model, bf16=bf16, chunk=chunk)

    def inputs(
        self,
        policy: nn.Module,
        batch: Batch,
        pad_id: int,
        reference_logps: torch.Tensor | None,
        reference_point: torch.Tensor | None,
    ) -> LossInputs:
        """`policy` is the wrapped scorer, so DDP/FSDP see the forward."""
        seqs = batch.sequences
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        token_logps = policy(input_ids, attention_mask, seqs.completion_mask, position_ids, layout)
        return LossInputs(
            policy_logps=seqs.per_sequence(token_logps),
            completion_lengths=seqs.completion_lengths(),
            reference_logps=reference_logps,
            labels=batch.labels,
            reference_point=reference_point,
            group_index=batch.group_index,
            targets=batch.targets,
        )

    def evaluation(self, config: Config, spec: LossSpec, run: RunContext) -> Evaluation:
        return PolicyEvaluation(
            config.data,
            config.eval,
            config.online,
            run.encoder,
            run.tokenizer,
            run.device,
            run.bf16,
            config.train.seed,
            run.prompt_suffix,
            verbose=run.is_main,
        )


class RewardHead:
    lora_task_type = "SEQ_CLS"
    samples_for_evaluation = False

    def load(self, cfg: ModelConfig) -> tuple[nn.Module, Any]:
        return load_reward_model(cfg)

    def scorer(self, model: nn.Module, bf16: bool, chunk: int) -> nn.Module:
        # Under LoRA the head is peft's trainable copy (a wrapper around the linear), so it is taken as it is.
        return ScalarScorer(model, unwrapped(model).score, bf16=bf16)

    def inputs(
        self,
        policy: nn.Module,
        batch: Batch,
        pad_id: int,
        reference_logps: torch.Tensor | None,
        reference_point: torch.Tensor | None,
    ) -> LossInputs:
        """One score per sequence, at its last non-pad token (as transformers' classifiers read it)."""
        seqs = batch.sequences
        positions = last_token_positions(seqs, pad_id)
        return LossInputs(
            scores=policy(*seqs.model_inputs()).flatten()[positions],
            completion_lengths=seqs.completion_lengths(),
            labels=batch.labels,
            group_index=batch.group_index,
            targets=batch.targets,
        )

    def evaluation(self, config: Config, spec: LossSpec, run: RunContext) -> Evaluation:
        return RewardModelEvaluation(
            config.data,
            config.eval,
            run.encoder,
            run.tokenizer.pad_token_id,
            run.device,
            config.train.seed,
            run.items,
            spec.data,
            verbose=run.is_main,
        )


HEADS: dict[str, PolicyHead | RewardHead] = {"policy": PolicyHead(), "reward": RewardHead()}
