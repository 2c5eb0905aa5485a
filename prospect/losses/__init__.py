"""Losses of the HALO family. Each module registers LossSpecs; `get_loss(name)` finds one."""

from prospect.losses import kto, pairwise, ppo, reference_free, reward, sft  # noqa: F401
from prospect.losses.base import LOSSES, LossInputs, LossOutput, LossSpec, get_loss

__all__ = ["LOSSES", "LossInputs", "LossOutput", "LossSpec", "get_loss"]
