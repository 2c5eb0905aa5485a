"""Judges that score generated text independently of the training labels.

A judge is called as judge(texts, prompts) -> scores, where `prompts` (EncodedPrompt items, or None) carry
the prompt and the row's fields for judges that need them, such as an exact-match verifier."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prospect.config import OnlineConfig
from prospect.errors import UserError
from prospect.rewards import load_reward

Judge = Callable[[list[str], list | None], list[float]]


def vader_judge() -> Judge:
    """VADER's lexicon-and-rules sentiment: the compound score in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def judge(texts: list[str], prompts: list | None = None) -> list[float]:
        return [analyzer.polarity_scores(t)["compound"] for t in texts]

    return judge


def reward_judge(online: OnlineConfig, device: torch.device, bf16: bool) -> Judge:
    """The online reward model or function (e.g. exact match against a reference answer) as the judge."""
    reward = load_reward(online, device, bf16)

    def judge(texts: list[str], prompts: list | None) -> list[float]:
        if prompts is None:
            raise UserError("eval.judge=reward needs the prompts it scores against")
        return reward([p.prompt for p in prompts], texts, [p.fields for p in prompts])

    return judge


def get_judge(
    name: str, online: OnlineConfig | None = None, device: torch.device | None = None, bf16: bool = False
) -> Judge | None:
    if name == "none":
        return None
    if name == "vader":
        return vader_judge()
    if name == "reward":
        return reward_judge(online or OnlineConfig(), device or torch.device("cpu"), bf16)
    raise UserError(f"unknown judge '{name}'; expected vader, reward or none")
