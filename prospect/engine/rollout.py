"""Online policy gradient on the engine: each step samples completions of its prompts from the live policy,
scores them, and makes several optimizer updates on them. The trainers differ only in their hooks:

* `RolloutTrainer`, the shared step. rollout: each prompt is sampled G = `online.samples_per_prompt` times
  through the sampling layer (`HFSampler`, set up once: the lean decoder prefills each prompt once for its
  G samples); the reward scores them (`rewards`); the rollout policy, and the reference when the loss uses
  one, give per-token log-probs with no gradient (`forward`); `advantages` turns scores into per-token
  advantages. updates: `passes()` passes over the rollout in minibatches, each one optimizer update of the
  loss on `TokenInputs` (accumulated in `train.grad_accum` pieces), normalised over the minibatch on all
  processes.
* `GroupTrainer` (loop "group": GRPO, RLOO): critic-free, advantages from the loss's `group_advantages` hook
  on each prompt's G sequence rewards.
* `PPOTrainer` (engine/ppo.py): a critic, GAE and the adaptive KL controller.

Set-up, the reference, checkpoints, logging and held-out evaluation are the engine's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from prospect.config import Config
from prospect.data.batching import Sequences, pad
from prospect.data.tokenize import EncodedPrompt, all_instances
from prospect.engine.launch import accumulating
from prospect.engine.metrics import StepStats
from prospect.engine.sharding import gathered
from prospect.engine.trainer import StepResult, Trainer
from prospect.errors import UserError
from prospect.losses.advantages import tied
from prospect.losses.base import LossInputs, TokenInputs
from prospect.losses.ppo import kl_penalty
from prospect.models.decoding import Mixture
from prospect.models.sampling import HFSampler, Sample, rollout_params
from prospect.rewards import check_reward, load_reward

Rollout = dict[str, Any]  # per-row tensors [rows] or [rows, T-1] of a rollout, by name (see `rollout`)
# The rollout's per-token tensors an update crops to its rows, named as TokenInputs names them.
TOKEN_FIELDS = ("old_logps", "advantages", "mask", "old_values", "returns", "reference_logps")


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


class RolloutTrainer(Trainer):
    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        super().__init__(config, callbacks)
        online = config.online
        self.reward = self.load_signal()
        self.sampler = HFSampler(  # the live policy's weights: one set-up for the whole run
            self.accelerator.unwrap_model(self.policy).model,
            self.tokenizer,
            batch_size=online.batch_size,
            bf16=self.bf16,
            decoder=online.sampler,
        )

    def check_options(self) -> None:
        super().check_options()
        name = self.spec.name
        self.check_signal()
        if self.cfg.online.sampler == "vllm":
            raise UserError(
                f"online.sampler=vllm: loss '{name}' samples from the live policy every step; use 'prospect'"
            )
        if self.cfg.train.reference_cache:
            raise UserError(
                f"train.reference_cache: loss '{name}' scores new samples every step; there is nothing to cache"
            )

    # ----- hooks --------------------------------------------------------------------------------
    def check_signal(self) -> None:
        """Fail on a bad reward setting before anything loads."""
        check_reward(self.cfg.online)

    def load_signal(self) -> Any:
        """What pays the samples: the reward model or function (`rewards` reads it)."""
        return load_reward(self.cfg.online, self.device, self.bf16)

    def passes(self) -> tuple[int, int]:
        """(passes over each rollout, minibatches per pass): each minibatch is one optimizer update."""
        return self.params.epochs, self.params.minibatches

    def updates_per_step(self) -> int:
        epochs, minibatches = self.passes()
        return epochs * minibatches

    def kl_estimator(self) -> str:
        """The per-token estimate of the KL to the reference that the rollout logs (and PPO pays)."""
        return "k1"

    def scores_rollout(self) -> bool:
        """Whether the rollout runs the policy over its samples before the updates: for the KL to the
        reference, or for the ratio to the sampling policy after the first update. With one update and no
        reference, the update's own log-probs, detached, are the sampling policy's, and the forward is saved."""
        return self.spec.needs_reference or self.updates_per_step() > 1

    def forward(self, seqs: Sequences, rollout: bool) -> dict[str, torch.Tensor]:
        """The policy's per-token tensors on `seqs`, named as TokenInputs names them: at rollout time (no
        gradient) `old_logps`, in an update `logps`."""
        logps = self.policy(seqs.input_ids, seqs.attention_mask, seqs.completion_mask)
        return {"old_logps" if rollout else "logps": logps}

    def rewards(self, prompts: list[EncodedPrompt], completions: list[list[str]]) -> torch.Tensor:
        """[prompts, G] sequence rewards of each prompt's G completions, from the reward model or function
        (Nash-MD's: a preference against an opponent)."""
        size = len(completions[0])
        scores = self.reward(
            [p.prompt for p in prompts for _ in range(size)],
            [c for group in completions for c in group],
            [p.fields for p in prompts for _ in range(size)],
        )
        return torch.tensor(scores, device=self.device).view(len(prompts), size)

    def advantages(self, batch: Rollout) -> None:
        """Add the per-token `advantages` (and whatever else the loss reads, e.g. PPO's `returns`)."""
        raise NotImplementedError

    def finish_metrics(self, batch: Rollout, stats: StepStats) -> Callable[[dict[str, float]], None]:
        """Add the method's own rollout statistics; return what to do with the reduced metrics."""
        return lambda metrics: None

    # ----- one rollout and its updates ----------------------------------------------------------
    def sample(self) -> tuple[list[EncodedPrompt], list[list[Sample]]]:
        """This process's prompts of the step and what the rollout samples for them (timed as sampling)."""
        return self.draw()

    def draw(
        self, mixture: Mixture | None = None, stream: int = 0
    ) -> tuple[list[EncodedPrompt], list[list[Sample]]]:
        """This process's prompts of the step and their samples, G each (from the geometric `mixture` of the
        policy and its reference when given). Each microbatch is sampled with the seed of its place in the
        global batch, so one process accumulating k microbatches samples what k processes do; `stream` gives
        a second set of samples of the same prompts its own seeds."""
        rank = self.accelerator.process_index
        micros = self.order.microbatches(self.step, rank)
        prompts: list[EncodedPrompt] = []
        samples: list[list[Sample]] = []
        for micro, indices in enumerate(micros):
            items = [self.data.items[i] for i in indices]
            if not all_instances(items, EncodedPrompt):
                raise ValueError(
                    f"loss '{self.spec.name}' samples from prompts; the training items are not prompts"
                )
            place = (self.step * len(micros) + micro) * self.world + rank
            seed = self.cfg.train.seed * 1_000_003 + place + stream * 500_009
            params = rollout_params(self.cfg.online, seed)
            with gathered(self.policy):
                samples += self.sampler.generate([p.prompt_ids for p in items], params, mixture=mixture)
            prompts += items
        return prompts, samples

    def rollout(self) -> Rollout:
        started = time.perf_counter()
        prompts, samples = self.sample()
        sampling = time.perf_counter() - started
        rows = [(p, s) for p, group in zip(prompts, samples) for s in group]
        texts = self.tokenizer.batch_decode([s.token_ids for _, s in rows], skip_special_tokens=True)
        size = len(samples[0])
        scores = self.rewards(prompts, [texts[i : i + size] for i in range(0, len(texts), size)])
        pad_id = self.tokenizer.pad_token_id
        seqs = pad([p.prompt_ids for p, _ in rows], [s.token_ids for _, s in rows], pad_id).to(self.device)
        mask = seqs.completion_mask[:, 1:].float()
        batch: Rollout = {
            "seqs": seqs,
            "mask": mask,
            "scores": scores.flatten(),
            "lengths": mask.sum(-1),
            "finished": torch.tensor([float(s.finished) for _, s in rows], device=self.device),
            "locations": [p.location for p, _ in rows],
            "sampling_s": sampling,
        }
        with torch.no_grad():
            if self.scores_rollout():
                batch.update(self.forward(seqs, rollout=True))
            if self.spec.needs_reference:
                if self.live_reference is None:
                    raise ValueError(f"loss '{self.spec.name}' needs the live reference model")
                reference = batch["reference_logps"] = self.live_reference.token_logps(seqs)
                token_kl = batch["token_kl"] = (
                    kl_penalty(batch["old_logps"], reference, self.kl_estimator()) * mask
                )
                batch["kl"] = token_kl.sum(-1)
        self.advantages(batch)
        return batch

    def train_step(self) -> dict[str, float]:
        acc = self.accelerator
        batch = self.rollout()
        self.policy.train()  # the rollout sampled in eval mode
        epochs, minibatches = self.passes()
        stats = StepStats()
        generator = torch.Generator().manual_seed(
            self.cfg.train.seed * 7919 + self.step * self.world + acc.process_index
        )
        grad_norm, skipped = 0.0, 0
        for _ in range(epochs):
            for rows in torch.randperm(batch["seqs"].num_sequences, generator=generator).chunk(minibatches):
                loss = self.update(batch, rows.to(self.device), stats)
                locations = [batch["locations"][i] for i in rows.tolist()]
                grad_norm, updated = self.optimizer_step(loss, locations)
                skipped += not updated
        named = [("score", batch["scores"]), ("length", batch["lengths"]), ("finished", batch["finished"])]
        for name, values in named + ([("kl", batch["kl"])] if "kl" in batch else []):
            stats.add_mean(name, values.sum(), float(values.numel()))
        stats.add_total("tokens", float(batch["seqs"].tokens * epochs))
        stats.add_total("generated_tokens", float(batch["mask"].sum()))
        finish = self.finish_metrics(batch, stats)
        metrics = stats.reduce(lambda x: acc.reduce(x.to(self.device), "sum").cpu())
        # Sampling throughput: the tokens all processes sampled over this process's time spent sampling.
        metrics["sampled_tokens_per_s"] = metrics["generated_tokens"] / max(batch["sampling_s"], 1e-9)
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if skipped:
            metrics["skipped"] = float(skipped)
        finish(metrics)
        return metrics

    def update(self, batch: Rollout, rows: torch.Tensor, stats: StepStats) -> float:
        """Forward and backward of the loss on `rows` of the rollout, in train.grad_accum pieces; returns the
        loss, averaged over the minibatch's units (completions or completion tokens) on all processes."""
        acc = self.accelerator
        count = (
            batch["mask"][rows].sum() if self.spec.normalize == "tokens" else torch.tensor(float(len(rows)))
        )
        units = acc.reduce(count.to(self.device), "sum")
        pieces = rows.chunk(self.cfg.train.grad_accum)
        total = torch.zeros((), device=self.device)
        for i, piece in enumerate(pieces):
            seqs, width = take(batch["seqs"], piece)
            crop = {k: batch[k][piece, : width - 1] for k in TOKEN_FIELDS if k in batch}
            with accumulating(acc, self.policy, last=i == len(pieces) - 1):
                fresh = self.forward(seqs, rollout=False)
                # With one update and no rollout forward, the policy that sampled the rows is this one.
                crop.setdefault("old_logps", fresh["logps"].detach())
                tokens = TokenInputs(**crop, **fresh, budget=self.cfg.online.max_new_tokens)
                out = self.spec.compute(LossInputs(tokens=tokens), self.params)
                loss = out.losses.sum() * self.world / units
                acc.backward(loss)
            total = total + loss.detach()
            for name, (value, n) in out.means.items():
                stats.add_mean(name, value, n)
        return float(acc.reduce(total, "sum")) / self.world


class GroupTrainer(RolloutTrainer):
    """Critic-free policy gradient (GRPO, RLOO): each sample's advantage comes from the rewards of its
    prompt's group, by the loss's `group_advantages` hook, and all its completion tokens share it."""

    min_group = 2  # samples per prompt the baseline needs

    def check_options(self) -> None:
        super().check_options()
        size = self.cfg.online.samples_per_prompt
        if size < self.min_group:
            raise UserError(
                f"online.samples_per_prompt={size}: loss '{self.spec.name}' compares each sample with the "
                f"others of its prompt; set it to {self.min_group} or more"
            )

    def advantages(self, batch: Rollout) -> None:
        hook = self.spec.group_advantages
        if hook is None:
            raise ValueError(f"loss '{self.spec.name}' declares no group_advantages")
        size = self.cfg.online.samples_per_prompt
        kl = batch["kl"].view(-1, size) if "kl" in batch else None
        advantages = hook(batch["scores"].view(-1, size), kl, self.params).flatten()
        batch["advantages"] = advantages[:, None] * batch["mask"]

    def finish_metrics(self, batch: Rollout, stats: StepStats) -> Callable[[dict[str, float]], None]:
        """The share of groups whose samples all scored the same (no signal), and the within-group std."""
        groups = batch["scores"].view(-1, self.cfg.online.samples_per_prompt)
        stats.add_mean("tied_groups", tied(groups).float().sum(), float(len(groups)))
        stats.add_mean("score_std", groups.std(-1).sum(), float(len(groups)))
        return super().finish_metrics(batch, stats)
