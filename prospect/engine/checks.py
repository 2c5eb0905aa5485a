"""Run settings that only make sense together (a loss and its batch size, the reference and LoRA), checked
before anything loads, each with a one-line error that says what to change."""

from __future__ import annotations

from prospect.config import Config, ModelConfig
from prospect.engine.heads import HEADS
from prospect.engine.periodic_eval import check_evaluation
from prospect.engine.publish import check_push_target
from prospect.errors import UserError
from prospect.losses.base import LossSpec
from prospect.options import suggest


def check_run_options(config: Config, spec: LossSpec) -> None:
    t, m, d = config.train, config.model, config.data
    if t.push_to_hub:
        check_push_target(t.push_to_hub, "train.push_to_hub")
    if d.rating_min is not None and d.rating_max is not None and d.rating_min > d.rating_max:
        raise UserError(f"data.rating_min={d.rating_min} is above data.rating_max={d.rating_max}")
    if d.desirable_above < d.undesirable_below:
        raise UserError(
            f"data.desirable_above={d.desirable_above} is below data.undesirable_below={d.undesirable_below}: "
            "a rating between them would be both desirable and undesirable"
        )
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
    check_evaluation(config, spec)


def check_sharding(sharded: bool, model: ModelConfig) -> None:
    if sharded and model.lora_r > 0:
        raise UserError(
            "model.lora_r: LoRA under FSDP or DeepSpeed is not supported; launch LoRA runs with "
            "configs/accelerate/ddp.yaml (the adapter is small enough to replicate)"
        )


def check_trackers(report_to: str) -> list[str] | None:
    """`train.report_to` as accelerate's tracker names, each known and installed (as accelerate finds them:
    it would drop a missing one with a warning, and log nothing); None for none."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    installed = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise UserError(
                f"train.report_to={report_to}: unknown tracker '{name}'{suggest(name, LOGGER_TYPE_TO_CLASS)}; "
                f"expected none or {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}"
            )
        if name not in installed:  # each tracker's package has its name (pip normalises _ to -)
            raise UserError(
                f"train.report_to={report_to}: tracker '{name}' is not installed (pip install {name})"
            )
    return names or None
