"""PPO for RLHF on the engine: each engine step is one rollout batch followed by several PPO updates.

rollout: the policy samples completions for a batch of prompts; a reward model or function scores them;
the rollout policy, the reference and the critic give per-token log-probs and values (no gradient).
rewards: -kl_coef * KL estimate at every completion token, plus the score on the last one.
advantages: GAE over completion tokens, whitened over the rollout (across processes).
updates: `ppo_epochs` passes over the rollout in `minibatches`, each an optimizer update of the `ppo`
loss (clipped ratio, clipped value loss, optional entropy bonus); then the adaptive KL controller moves.
Setup, the reference, checkpoints, logging and held-out evaluation are the engine's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prospect.config import Config
from prospect.data.batching import Sequences, pad
from prospect.data.tokenize import EncodedPrompt, all_instances
from prospect.engine.metrics import StepStats
from prospect.engine.sharding import gathered
from prospect.engine.trainer import StepResult, Trainer
from prospect.errors import UserError
from prospect.losses.advantages import gae, masked_mean, whiten
from prospect.losses.base import LossInputs, TokenInputs
from prospect.losses.kl_control import KLController
from prospect.losses.ppo import kl_penalty
from prospect.models.attention import unwrapped
from prospect.models.sampling import HFSampler, rollout_params
from prospect.models.scalar_head import ScalarScorer, load_reward_model, score_head
from prospect.models.scoring import TokenScorer
from prospect.rewards import check_reward, load_reward


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


def take(seqs: Sequences, rows: torch.Tensor) -> tuple[Sequences, int]:
    """The given rows of a right-padded batch, cropped to their longest sequence."""
    if seqs.attention_mask is None:
        raise ValueError("take: expected padded rows with an attention mask, not packed ones")
    width = int(seqs.attention_mask[rows].sum(-1).max())
    index = torch.arange(len(rows), device=rows.device).unsqueeze(1).expand(-1, width)
    kept = seqs.sequence_index[rows, :width] >= 0
    sub = Sequences(
        seqs.input_ids[rows, :width],
        seqs.attention_mask[rows, :width],
        seqs.completion_mask[rows, :width],
        torch.where(kept, index, -1),
        len(rows),
    )
    return sub, width


class PPOTrainer(Trainer):
    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        super().__init__(config, callbacks)
        p, online = self.params, config.online
        if config.train.grad_accum != 1:
            raise UserError(
                "train.grad_accum: PPO splits each rollout into loss.minibatches instead; set it to 1"
            )
        if online.sampler == "vllm":
            raise UserError(
                "online.sampler=vllm: PPO samples from the live policy every step; use 'prospect'"
            )
        self.reward = load_reward(online, self.device, self.bf16)
        self.kl = KLController(p.kl_coef, p.kl_target or None, p.kl_horizon)
        self.sampler = HFSampler(
            self.accelerator.unwrap_model(self.policy).model,
            self.tokenizer,
            batch_size=online.batch_size,
            bf16=self.bf16,
            decoder=online.sampler,
        )

    def check_options(self) -> None:
        super().check_options()
        check_reward(self.cfg.online)
        if self.cfg.train.reference_cache:
            raise UserError(
                "train.reference_cache: PPO scores new samples every step; there is nothing to cache"
            )

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

    def updates_per_step(self) -> int:
        return self.params.ppo_epochs * self.params.minibatches

    def loop_state(self) -> dict:
        return {**super().loop_state(), "kl_coef": self.kl.coef}

    def load_loop_state(self, state: dict) -> None:
        super().load_loop_state(state)
        self.kl.coef = state.get("kl_coef", self.kl.coef)

    # ----- one rollout and its updates ----------------------------------------------------------
    def rollout(self) -> dict:
        rank = self.accelerator.process_index
        (indices,) = self.order.microbatches(self.step, rank)
        prompts = [self.data.items[i] for i in indices]
        if not all_instances(prompts, EncodedPrompt):
            raise ValueError("PPO samples from prompts; the training items are not prompts")
        params = rollout_params(
            self.cfg.online, self.cfg.train.seed * 1_000_003 + self.step * self.world + rank
        )
        with gathered(self.policy):
            samples = self.sampler.generate([p.prompt_ids for p in prompts], params)
        rows = [(p, s) for p, group in zip(prompts, samples) for s in group]
        texts = self.tokenizer.batch_decode([s.token_ids for _, s in rows], skip_special_tokens=True)
        rewarded = self.reward([p.prompt for p, _ in rows], texts, [p.fields for p, _ in rows])
        scores = torch.tensor(rewarded, device=self.device)
        seqs = pad(
            [p.prompt_ids for p, _ in rows], [s.token_ids for _, s in rows], self.tokenizer.pad_token_id
        )
        seqs = seqs.to(self.device)
        if self.live_reference is None:
            raise ValueError("PPO's KL penalty needs the live reference model")
        with torch.no_grad():
            old_logps, _, old_values = self.policy(
                seqs.input_ids, seqs.attention_mask, seqs.completion_mask, mode="values"
            )
            reference = self.live_reference.token_logps(seqs)
        mask = seqs.completion_mask[:, 1:].float()
        kl = kl_penalty(old_logps, reference, self.params.kl_estimator) * mask
        rewards = -self.kl.coef * kl
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
        rewards[torch.arange(len(rows)), last] += scores
        advantages, returns = gae(rewards, old_values, mask, self.params.gamma, self.params.lam)
        if self.params.whiten_advantages:
            advantages = whiten(advantages, mask, lambda x: self.accelerator.reduce(x, "sum"))
        return {
            "seqs": seqs,
            "mask": mask,
            "old_logps": old_logps,
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
            "scores": scores,
            "kl": kl.sum(-1),
            "lengths": mask.sum(-1),
            "finished": torch.tensor([float(s.finished) for _, s in rows]),
            "locations": [p.location for p, _ in rows],
        }

    def train_step(self) -> dict[str, float]:
        p, acc = self.params, self.accelerator
        batch = self.rollout()
        self.policy.train()  # the rollout sampled in eval mode
        n = batch["seqs"].num_sequences
        stats = StepStats()
        generator = torch.Generator().manual_seed(
            self.cfg.train.seed * 7919 + self.step * self.world + acc.process_index
        )
        grad_norm, skipped = 0.0, 0
        for _ in range(p.ppo_epochs):
            for rows in torch.randperm(n, generator=generator).chunk(p.minibatches):
                rows = rows.to(self.device)
                seqs, width = take(batch["seqs"], rows)
                crop = {
                    k: batch[k][rows, : width - 1]
                    for k in ("old_logps", "advantages", "old_values", "returns", "mask")
                }
                logps, entropy, values = self.policy(
                    seqs.input_ids, seqs.attention_mask, seqs.completion_mask, mode="train"
                )
                tokens = TokenInputs(
                    logps,
                    crop["old_logps"],
                    crop["advantages"],
                    values,
                    crop["old_values"],
                    crop["returns"],
                    crop["mask"],
                    entropy,
                )
                out = self.spec.compute(LossInputs(tokens=tokens), self.params)
                units = acc.reduce(tokens.mask.sum(), "sum")
                loss = out.losses.sum() * self.world / units
                acc.backward(loss)
                for name, (total, count) in out.means.items():
                    stats.add_mean(name, total, count)
                total_loss = float(acc.reduce(loss.detach(), "sum")) / self.world
                locations = [batch["locations"][i] for i in rows.tolist()]
                grad_norm, updated = self.optimizer_step(total_loss, locations)
                skipped += not updated
        mask = batch["mask"]
        residual = (batch["returns"] - batch["old_values"]) * mask
        for name, values in (
            ("score", batch["scores"]),
            ("kl", batch["kl"]),
            ("length", batch["lengths"]),
            ("finished", batch["finished"].to(self.device)),
        ):
            stats.add_mean(name, values.sum(), float(values.numel()))
        stats.add_mean(
            "returns_var",
            ((batch["returns"] - masked_mean(batch["returns"], mask)) ** 2 * mask).sum(),
            mask.sum(),
        )
        stats.add_mean(
            "residual_var", ((residual - masked_mean(residual, mask)) ** 2 * mask).sum(), mask.sum()
        )
        stats.add_total("tokens", float(batch["seqs"].tokens * p.ppo_epochs))
        metrics = stats.reduce(lambda x: acc.reduce(x.to(self.device), "sum").cpu())
        metrics["explained_variance"] = 1.0 - metrics.pop("residual_var") / max(
            metrics.pop("returns_var"), 1e-8
        )
        metrics["kl_coef"] = self.kl.coef
        metrics["reward"] = metrics["score"] - self.kl.coef * metrics["kl"]
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if skipped:
            metrics["skipped"] = float(skipped)
        self.kl.update(metrics["kl"], self.global_batch * self.cfg.online.samples_per_prompt)
        return metrics
