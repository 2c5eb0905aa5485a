"""PPO for RLHF on the engine's rollout loop (engine/rollout.py): each step is one rollout followed by several
PPO updates.

rollout: the policy samples completions for a batch of prompts; a reward model or function scores them;
the rollout policy, the reference and the critic give per-token log-probs and values (no gradient).
rewards: -kl_coef * KL estimate at every completion token, plus the score on the last one.
advantages: GAE over completion tokens, whitened over the rollout (across processes).
updates: `ppo_epochs` passes over the rollout in `minibatches`, each an optimizer update of the `ppo`
loss (clipped ratio, clipped value loss, optional entropy bonus); then the adaptive KL controller moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prospect.config import Config
from prospect.data.batching import Sequences
from prospect.engine.metrics import StepStats
from prospect.engine.rollout import Rollout, RolloutTrainer
from prospect.engine.trainer import StepResult, Trainer
from prospect.losses.advantages import gae, masked_mean, whiten
from prospect.losses.kl_control import KLController
from prospect.models.attention import unwrapped
from prospect.models.scalar_head import ScalarScorer, load_reward_model, score_head
from prospect.models.scoring import TokenScorer


class ActorCritic(nn.Module):
    """The policy and its critic in one module, so one DDP/FSDP wrapper and one optimizer hold both. The
    critic is a scalar head on its own trunk (`critic`), or on the policy's trunk (`value_head`)."""

    def __init__(
        self, actor: TokenScorer, critic: ScalarScorer | None = None, value_head: nn.Linear | None = None
    ):
        super().__init__()
        self.actor, self.critic, self.value_head = actor, critic, value_head

    @property
    def model(self) -> nn.Module:  # the policy, as a TokenScorer exposes it
        return self.actor.model

    def sequence_logps(self, seqs: Sequences) -> torch.Tensor:
        return self.actor.sequence_logps(seqs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        completion_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mode: str = "logps",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """mode 'logps': token log-probs; 'values': (log-probs, None, values); 'train': (log-probs, entropy,
        values). Values are aligned with the next-token positions, [rows, T-1]."""
        if mode == "logps":
            return self.actor(input_ids, attention_mask, completion_mask, position_ids)
        shared = self.critic is None
        out = self.actor.compute(
            input_ids, attention_mask, completion_mask, position_ids, entropy=mode == "train", hidden=shared
        )
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, position_ids)
        elif self.value_head is not None and out.hidden is not None:  # hidden states were asked for
            values = self.value_head(out.hidden.float()).squeeze(-1)
        else:
            raise ValueError("ActorCritic needs a critic or a value head")
        return out.logps, out.entropy, values[:, :-1]


class PPOTrainer(RolloutTrainer):
    """The rollout loop with a critic: per-token rewards (the KL penalty, the score on the last token), GAE
    advantages and returns, the clipped value loss, and the KL controller, whose coefficient checkpoints keep."""

    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        super().__init__(config, callbacks)
        p = self.params
        self.kl = KLController(p.kl_coef, p.kl_target or None, p.kl_horizon)

    def build_scorer(self) -> nn.Module:
        p, m = self.params, self.cfg.model
        actor = TokenScorer(self.model, bf16=self.bf16, chunk=self.cfg.train.logprob_chunk)
        if p.critic == "shared":
            hidden = unwrapped(self.model).config.get_text_config().hidden_size
            head = nn.Linear(hidden, 1)
            nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
            nn.init.zeros_(head.bias)
            return ActorCritic(actor, value_head=head)
        source = (
            self.cfg.online.reward_model
            if p.critic_init == "reward" and self.cfg.online.reward_model
            else None
        )
        critic_cfg = type(m)(**{**m.__dict__, "name": source}) if source else m
        critic_model, _ = load_reward_model(critic_cfg)
        return ActorCritic(actor, critic=ScalarScorer(critic_model, score_head(critic_model), bf16=self.bf16))

    def passes(self) -> tuple[int, int]:
        return self.params.ppo_epochs, self.params.minibatches

    def kl_estimator(self) -> str:
        return self.params.kl_estimator

    def loop_state(self) -> dict:
        return {**super().loop_state(), "kl_coef": self.kl.coef}

    def load_loop_state(self, state: dict) -> None:
        super().load_loop_state(state)
        self.kl.coef = state.get("kl_coef", self.kl.coef)

    def scores_rollout(self) -> bool:
        return True  # the critic's values at sampling time set the advantages

    def forward(self, seqs: Sequences, rollout: bool) -> dict[str, torch.Tensor]:
        """The actor's log-probs and the critic's values; in an update, the entropy too."""
        out = self.policy(
            seqs.input_ids, seqs.attention_mask, seqs.completion_mask, mode="values" if rollout else "train"
        )
        logps, entropy, values = out
        if rollout:
            return {"old_logps": logps, "old_values": values}
        return {"logps": logps, "entropy": entropy, "values": values}

    def advantages(self, batch: Rollout) -> None:
        """-kl_coef * KL at every completion token and the score on the last, through GAE; whitened."""
        mask, p = batch["mask"], self.params
        rewards = -self.kl.coef * batch["token_kl"]
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        rewards[torch.arange(len(last)), last] += batch["scores"]
        advantages, batch["returns"] = gae(rewards, batch["old_values"], mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, mask, lambda x: self.accelerator.reduce(x, "sum"))
        batch["advantages"] = advantages

    def finish_metrics(self, batch: Rollout, stats: StepStats) -> Callable[[dict[str, float]], None]:
        """Explained variance of the returns by the values, the reward net of the KL penalty; then the KL
        controller moves."""
        mask, returns = batch["mask"], batch["returns"]
        residual = (returns - batch["old_values"]) * mask
        stats.add_mean("returns_var", ((returns - masked_mean(returns, mask)) ** 2 * mask).sum(), mask.sum())
        stats.add_mean(
            "residual_var", ((residual - masked_mean(residual, mask)) ** 2 * mask).sum(), mask.sum()
        )

        def finish(metrics: dict[str, float]) -> None:
            metrics["explained_variance"] = 1.0 - metrics.pop("residual_var") / max(
                metrics.pop("returns_var"), 1e-8
            )
            metrics["kl_coef"] = self.kl.coef
            metrics["reward"] = metrics["score"] - self.kl.coef * metrics["kl"]
            self.kl.update(metrics["kl"], self.global_batch * self.cfg.online.samples_per_prompt)

        return finish
