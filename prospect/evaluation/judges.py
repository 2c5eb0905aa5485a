"""Judges that score generated text independently of the training labels.

A judge is called as judge(texts, prompts) -> scores, where `prompts` (EncodedPrompt items, or None) carry
the prompt and the row's fields for judges that need them, such as an exact-match verifier. `prospect eval`
names its judges (`load_judge`): these scoring judges, and AI judges that compare two completions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prospect.config import OnlineConfig
from prospect.data.convert import half_ties
from prospect.data.formats import Text
from prospect.errors import UserError
from prospect.evaluation.ai_judges import AIJudge, HTTPJudge, LocalJudge, local_judge
from prospect.evaluation.preferences import bradley_terry
from prospect.models.gpo import GPOReward
from prospect.models.loading import looks_local
from prospect.recipe import run_model
from prospect.rewards import FunctionReward, ModelReward, PairwisePreference, load_reward

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


# ----- the judges of `prospect eval`, by name ---------------------------------------------------

JUDGE_NAMES = "vader, exact-match, reward:PATH, pairwise:PATH, gpo:RUN:CONTEXT, verifier:MODULE:FUNCTION, llm:PATH, http:URL"
Compare = Callable[[list[Text], list[tuple[str, str]]], list[float | None]]


@dataclass
class AIJudgeOptions:
    """How `llm:` and `http:` judges are asked: the HTTP endpoint's model and key, reasoning first or not."""

    model: str | None = None
    key_env: str | None = None
    allow_http: bool = False
    cot: bool = False


@dataclass
class NamedJudge:
    """A judge as the user named it. A scoring judge scores each completion (`score`); a comparing judge (an
    AI judge, a pairwise preference model) reads two completions in both orders (`compare`: P(first is
    better), None when its verdict could not be read); an AI judge counts its calls (`ai`)."""

    name: str
    score: Judge | None = None
    compare: Compare | None = None
    ai: AIJudge | None = None
    bradley_terry: bool = False  # its scores are a reward model's: P = sigmoid(difference)

    def prefer(
        self, prompts: list[Text], pairs: list[tuple[str, str]], items: list | None = None
    ) -> list[float | None]:
        """P(first > second | prompt) for each pair, whatever the judge: its comparison, or its two scores as
        a Bradley-Terry preference (reward models) or a hard one (1, 0.5 on a tie, 0: the lexicon, verifiers).
        `items` (EncodedPrompt, one per pair) carry the fields that verifiers read."""
        if self.compare is not None:
            return self.compare(prompts, pairs)
        if self.score is None:
            raise ValueError(f"judge {self.name} neither scores nor compares")
        firsts = self.score([a for a, _ in pairs], items)
        seconds = self.score([b for _, b in pairs], items)
        as_preference = bradley_terry if self.bradley_terry else half_ties
        return [as_preference(a, b) for a, b in zip(firsts, seconds)]


LOCAL_MODELS = {
    "reward": "a reward model: a reward run or its final/",
    "pairwise": "a pairwise preference model: a run of loss 'preference' or its final/",
    "llm": "a causal LM",
}


def check_judges(names: str, options: AIJudgeOptions, option: str = "--judges") -> list[str]:
    """The comma-separated judge names, each checked (paths exist, functions import, URLs are https) before
    anything slow runs; errors name `option`."""
    judges = [n.strip() for n in names.split(",") if n.strip()]
    if not judges:
        raise UserError(f"{option}: name at least one judge ({JUDGE_NAMES})")
    if len(set(judges)) < len(judges):
        raise UserError(f"{option} {names}: a judge is named twice")
    for name in judges:
        kind, _, arg = name.partition(":")
        if name in ("vader", "exact-match"):
            continue
        if kind == "gpo":
            GPOReward.check(name)
            continue
        if kind not in (*LOCAL_MODELS, "verifier", "http") or not arg:
            raise UserError(f"{option}: unknown judge '{name}'; expected {JUDGE_NAMES}")
        if kind in LOCAL_MODELS and looks_local(arg) and not Path(arg).expanduser().exists():
            raise UserError(
                f"{option} {name}: no such directory (expected {LOCAL_MODELS[kind]}, or a hub name)"
            )
        if kind == "verifier":
            FunctionReward(arg, f"{option} verifier")
        if kind == "http":
            http_judge(arg, options)
    return judges


def http_judge(url: str, options: AIJudgeOptions) -> HTTPJudge:
    if not (options.model and options.key_env):
        raise UserError(
            f"--judges http:{url} needs --judge-model (the model to ask for) and --judge-key-env (the name of the "
            "environment variable holding the API key)"
        )
    return HTTPJudge(
        url,
        options.model,
        options.key_env,
        allow_http=options.allow_http,
        options=("--judges http", "--judge-allow-http"),
    )


def load_judge(name: str, options: AIJudgeOptions, device: torch.device, bf16: bool) -> NamedJudge:
    """The judge `name` (checked by check_judges), loaded."""
    kind, _, arg = name.partition(":")
    if name == "vader":
        return NamedJudge(name, score=vader_judge())
    if kind in ("verifier", "exact-match"):
        online = OnlineConfig(reward_function=arg or "prospect.data.tasks:exact_match")
        return NamedJudge(name, score=reward_judge(online, device, bf16))
    if kind == "reward":
        online = OnlineConfig(reward_model=run_model(arg))
        return NamedJudge(name, score=reward_judge(online, device, bf16), bradley_terry=True)
    if kind == "gpo":  # a group's predicted rating, read as a Bradley-Terry preference like a reward model
        online = OnlineConfig(reward_model=name)
        return NamedJudge(name, score=reward_judge(online, device, bf16), bradley_terry=True)
    if kind == "pairwise":
        return NamedJudge(name, compare=PairwisePreference(ModelReward.load(run_model(arg), device, bf16)))
    if kind == "llm":
        complete: LocalJudge | HTTPJudge = local_judge(arg, device, bf16)
    else:
        complete = http_judge(arg, options)
    ai = AIJudge(complete, cot=options.cot)
    return NamedJudge(name, compare=ai.compare, ai=ai)
