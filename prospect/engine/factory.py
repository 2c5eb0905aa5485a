"""The trainer a loss runs in, by its declared loop: the offline engine, or rollouts on top of it (PPO with a
critic; GRPO and RLOO with group baselines; Nash-MD against a mixture opponent), or denoisers' images."""

from __future__ import annotations

from collections.abc import Callable

from prospect.config import Config
from prospect.engine.diffusion import DiffusionTrainer
from prospect.engine.nash import NashTrainer
from prospect.engine.ppo import PPOTrainer
from prospect.engine.rollout import GroupTrainer
from prospect.engine.trainer import StepResult, Trainer
from prospect.losses import get_loss

TRAINERS: dict[str, type[Trainer]] = {
    "offline": Trainer,
    "ppo": PPOTrainer,
    "group": GroupTrainer,
    "nash": NashTrainer,
    "diffusion": DiffusionTrainer,
}


def make_trainer(
    config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None
) -> Trainer:
    return TRAINERS[get_loss(config.loss_name).loop](config, callbacks)
