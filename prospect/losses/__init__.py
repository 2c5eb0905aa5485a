"""Losses of the HALO family. Each module registers a LossSpec; `get_loss(name)` finds it."""

from prospect.losses import kto  # noqa: F401
from prospect.losses.base import LOSSES, LossInputs, LossOutput, LossSpec, get_loss

__all__ = ["LOSSES", "LossInputs", "LossOutput", "LossSpec", "get_loss"]
