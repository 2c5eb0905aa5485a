"""Pick the loop a loss runs in: the offline engine, or PPO's rollout-and-update steps on top of it."""

from __future__ import annotations

from prospect.config import Config
from prospect.engine.trainer import Trainer
from prospect.losses.base import get_loss


def make_trainer(config: Config, callbacks=None) -> Trainer:
    if get_loss(config.loss_name).loop == "ppo":
        from prospect.online.ppo import PPOTrainer

        return PPOTrainer(config, callbacks)
    return Trainer(config, callbacks)
