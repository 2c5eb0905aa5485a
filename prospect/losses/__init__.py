"""Losses of the HALO family and the RLHF pipeline. Each module lists its LossSpecs in `SPECS`; the registry
below is built from those lists, so a loss in a new module is one more name in `MODULES`."""

from __future__ import annotations

from prospect.errors import UserError
from prospect.losses import diffusion, group, kto, nash, pairwise, ppo, reference_free, reward_model, sft
from prospect.losses.base import LossInputs, LossOutput, LossSpec
from prospect.options import suggest

MODULES = (kto, pairwise, reference_free, sft, reward_model, ppo, group, nash, diffusion)
LOSSES: dict[str, LossSpec] = {spec.name: spec for module in MODULES for spec in module.SPECS}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise UserError(
            f"unknown loss '{name}'{suggest(name, LOSSES)}; available: {', '.join(sorted(LOSSES))}"
        )
    return LOSSES[name]


__all__ = ["LOSSES", "LossInputs", "LossOutput", "LossSpec", "get_loss"]
