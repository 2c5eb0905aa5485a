"""What the trained module computes for a loss, chosen by `LossSpec.model`: one object per head, so the loop
never asks which kind of model it trains.

- `PolicyHead`: a causal LM; the loss sees summed completion log-probs (and the reference's).
- `RewardHead`: a sequence classifier with one output; the loss sees one score per sequence.

Each says how to load the model, what LoRA task it is, which module accelerate wraps, how a batch becomes
`LossInputs`, and how the model is evaluated on held-out data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from prospect.config import Config, ModelConfig
from prospect.data.batching import Batch, Sequences
from prospect.data.tokenize import Encoder
from prospect.evaluation.heldout import PolicyEvaluation
from prospect.evaluation.reward_model import RewardModelEvaluation
from prospect.losses.base import LossInputs, LossSpec
from prospect.models.attention import unwrapped
from prospect.models.loading import load_model
from prospect.models.scalar_head import ScalarScorer, last_token_positions, load_reward_model
from prospect.models.scoring import TokenScorer


class Evaluation(Protocol):
    @property
    def result_type(self) -> type: ...  # the result's dataclass, to load a saved one

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


class Head:
    """What every head shares: a batch becomes `LossInputs` with the model's `outputs` and the batch's own
    fields. The reference's log-probs and the reference point are computed by the loop beforehand."""

    lora_task_type: str
    samples_for_evaluation: bool  # held-out evaluation samples from the model (its KL needs a reference)

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
        return dataclasses.replace(
            self.outputs(policy, seqs, pad_id),
            completion_lengths=seqs.completion_lengths(),
            reference_logps=reference_logps,
            labels=batch.labels,
            reference_point=reference_point,
            group_index=batch.group_index,
            targets=batch.targets,
            agreement=batch.agreement,
        )

    def outputs(self, policy: nn.Module, seqs: Sequences, pad_id: int) -> LossInputs:
        """The model's own outputs for the loss."""
        raise NotImplementedError


class PolicyHead(Head):
    lora_task_type = "CAUSAL_LM"
    samples_for_evaluation = True

    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
        return load_model(cfg)

    def scorer(self, model: nn.Module, bf16: bool, chunk: int) -> nn.Module:
        return TokenScorer(model, bf16=bf16, chunk=chunk)

    def outputs(self, policy: nn.Module, seqs: Sequences, pad_id: int) -> LossInputs:
        """Summed completion log-probs per sequence."""
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        token_logps = policy(input_ids, attention_mask, seqs.completion_mask, position_ids, layout)
        return LossInputs(policy_logps=seqs.per_sequence(token_logps))

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


class RewardHead(Head):
    lora_task_type = "SEQ_CLS"
    samples_for_evaluation = False

    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, Any]:
        return load_reward_model(cfg)

    def scorer(self, model: nn.Module, bf16: bool, chunk: int) -> nn.Module:
        # Under LoRA the head is peft's trainable copy (a wrapper around the linear), so it is taken as it is.
        return ScalarScorer(model, unwrapped(model).get_submodule("score"), bf16=bf16)

    def outputs(self, policy: nn.Module, seqs: Sequences, pad_id: int) -> LossInputs:
        """One score per sequence, at its last non-pad token (as transformers' classifiers read it)."""
        return LossInputs(scores=policy(*seqs.model_inputs()).flatten()[last_token_positions(seqs, pad_id)])

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
