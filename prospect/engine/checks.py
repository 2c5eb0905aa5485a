"""Run settings that only make sense together (a loss and its batch size, the reference and LoRA), checked
before anything loads, each with a one-line error that says what to change."""

from __future__ import annotations

from prospect.config import Config, ModelConfig
from prospect.engine.heads import HEADS
from prospect.errors import UserError
from prospect.losses.base import LossSpec


def check_run_options(config: Config, spec: LossSpec) -> None:
    t, m = config.train, config.model
    point = spec.reference_point
    if point is not None and t.batch_size < point.min_batch_size:
        raise UserError(
            f"train.batch_size={t.batch_size}: loss '{spec.name}' {point.why}, so it needs a batch "
            f"size of at least {point.min_batch_size}"
        )
    if t.reference_refresh_every and (m.lora_r > 0 or t.reference_cache):
        raise UserError(
            "train.reference_refresh_every needs full fine-tuning with train.reference_cache=false "
            "(a refreshed reference cannot be the adapter-disabled model or a precomputed cache)"
        )
    # The frozen copy a refresh updates exists for the loss's reference, or for the held-out KL of samples.
    samples = config.eval.num_prompts > 0 and HEADS[spec.model].samples_for_evaluation
    if t.reference_refresh_every and not (spec.needs_reference or samples):
        raise UserError(
            f"train.reference_refresh_every: loss '{spec.name}' uses no reference model (nor does held-out "
            "evaluation here), so there is none to refresh"
        )
    if t.reference_cache and not spec.needs_reference:
        raise UserError(f"train.reference_cache: loss '{spec.name}' uses no reference model")
    if t.reference_model and (m.lora_r > 0 or t.reference == "adapter"):
        raise UserError("train.reference_model needs train.reference=copy without LoRA")


def check_sharding(sharded: bool, model: ModelConfig) -> None:
    if sharded and model.lora_r > 0:
        raise UserError(
            "model.lora_r: LoRA under FSDP or DeepSpeed is not supported; launch LoRA runs with "
            "configs/accelerate/ddp.yaml (the adapter is small enough to replicate)"
        )
