"""Nash-MD in the rollout loop (losses/nash.py has the method's formulas): each step samples the policy's
completions y and, for the same prompts, the opponent's y' from the token-level geometric mixture of the
policy and its reference; a preference source, named by `online.preference` like any judge (a pairwise
preference model, a reward model read as Bradley-Terry, an LLM judge in both orders, a verifier), pays each
y with P(y > y'). The advantages, the KL and the update are the group loop's."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prospect.data.tokenize import EncodedPrompt
from prospect.engine.metrics import StepStats
from prospect.engine.rollout import GroupTrainer, Rollout
from prospect.errors import UserError
from prospect.evaluation.judges import AIJudgeOptions, NamedJudge, check_judges, load_judge
from prospect.models.sampling import Sample


class NashTrainer(GroupTrainer):
    min_group = 1  # the opponent, not the other samples of the prompt, is the baseline
    opponents: list[list[Sample]]
    unjudged: int = 0

    def judge_options(self) -> AIJudgeOptions:
        loop = self.cfg.loop
        return AIJudgeOptions(loop.judge_model, loop.judge_key_env, loop.judge_allow_http, loop.judge_cot)

    def check_signal(self) -> None:
        source = self.cfg.online.preference
        if not source:
            raise UserError(
                f"loss '{self.spec.name}' is paid by a preference: set online.preference (pairwise:PATH, "
                "reward:PATH, verifier:MODULE:FUNCTION, exact-match, vader, llm:PATH or http:URL)"
            )
        if len(check_judges(source, self.judge_options(), option="online.preference")) > 1:
            raise UserError(f"online.preference={source}: name one preference source")

    def load_signal(self) -> NamedJudge:
        assert self.cfg.online.preference is not None
        return load_judge(self.cfg.online.preference, self.judge_options(), self.device, self.bf16)

    def sample(self) -> tuple[list[EncodedPrompt], list[list[Sample]]]:
        """The policy's samples; the opponents', from the mixture with the reference, kept for `rewards`."""
        prompts, samples = self.draw()
        if self.live_reference is None:
            raise ValueError(f"loss '{self.spec.name}' needs the live reference model for its opponent")
        _, self.opponents = self.draw(self.live_reference.mixture(self.params.mixture), stream=1)
        return prompts, samples

    def rewards(self, prompts: list[EncodedPrompt], completions: list[list[str]]) -> torch.Tensor:
        """[prompts, G]: P(y > y') of each sample over the opponent drawn for it; an unreadable verdict is a tie."""
        size = len(completions[0])
        opponents = self.tokenizer.batch_decode(
            [s.token_ids for group in self.opponents for s in group], skip_special_tokens=True
        )
        items = [p for p in prompts for _ in range(size)]
        pairs = list(zip([c for group in completions for c in group], opponents, strict=True))
        verdicts = self.reward.prefer([p.prompt for p in items], pairs, items)
        self.unjudged = sum(v is None for v in verdicts)
        values = [0.5 if v is None else v for v in verdicts]
        return torch.tensor(values, device=self.device).view(len(prompts), size)

    def finish_metrics(self, batch: Rollout, stats: StepStats) -> Callable[[dict[str, float]], None]:
        """`score` is the mean P(y > y'): the policy's win rate against its opponent. Also the opponents'
        length, the verdicts that could not be read, and a sampling throughput that counts the opponents'
        tokens too (the time spent sampling covers both)."""
        lengths = torch.tensor([float(len(s.token_ids)) for g in self.opponents for s in g])
        stats.add_mean("opponent_length", lengths.sum(), float(len(lengths)))
        stats.add_total("opponent_tokens", float(lengths.sum()))
        stats.add_total("unjudged", float(self.unjudged))

        def with_opponents(metrics: dict[str, float]) -> None:
            sampled = metrics["generated_tokens"] + metrics["opponent_tokens"]
            metrics["sampled_tokens_per_s"] = sampled / max(batch["sampling_s"], 1e-9)

        return with_opponents
