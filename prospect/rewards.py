"""Reward sources: a trained reward model, or any Python function given by import path; and a pairwise
preference model's P(first > second).

One interface, `RewardFn(prompts, completions, fields) -> scores`, used by the online loops, PPO, best-of-N and
the held-out judge, so this module sits below all of them."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import torch

from prospect.config import ModelConfig, OnlineConfig
from prospect.data.convert import as_completion, duel_text
from prospect.data.formats import Text, parse_example
from prospect.data.sources import read_rows
from prospect.data.tokenize import Encoder
from prospect.errors import UserError
from prospect.io import write_jsonl
from prospect.models.gpo import GPOReward
from prospect.models.loading import looks_local
from prospect.models.scalar_head import ScalarScorer, load_reward_model, score_head, score_in_batches

GPO_PREFIX = "gpo:"  # online.reward_model=gpo:RUN:CONTEXT, a GPO module conditioned on one group's examples
RewardFn = Callable[..., list[float]]  # (prompts, completions, fields per prompt or None) -> scores


class ModelReward:
    """Scores (prompt, completion text) with a reward model, encoding them with its own tokenizer and chat
    template, so the policy and reward model need not share a tokenizer."""

    def __init__(self, scorer: ScalarScorer, encoder: Encoder, pad_id: int, device: torch.device):
        self.scorer, self.encoder, self.pad_id, self.device = scorer, encoder, pad_id, device

    @classmethod
    def load(cls, path: str, device: torch.device, bf16: bool, max_length: int = 1024) -> ModelReward:
        model, tokenizer = load_reward_model(ModelConfig(name=path))
        model.requires_grad_(False)
        model.eval().to(device)
        scorer = ScalarScorer(model, score_head(model), bf16=bf16)
        return cls(scorer, Encoder(tokenizer, max_length, max_length // 2), tokenizer.pad_token_id, device)

    def __call__(
        self, prompts: list[Text], completions: list[str], fields: list[dict] | None = None
    ) -> list[float]:
        items = [self.encoder.encode(p, as_completion(p, c), None, "") for p, c in zip(prompts, completions)]
        prompt_ids, completion_ids = [i.prompt_ids for i in items], [i.completion_ids for i in items]
        return score_in_batches(self.scorer, prompt_ids, completion_ids, self.pad_id, self.device)


class PairwisePreference:
    """P(first > second | prompt) from a pairwise preference model (a run of loss 'preference'): the mean of
    its two readings, sigmoid(s(x, first, second)) and 1 - sigmoid(s(x, second, first))."""

    def __init__(self, model: ModelReward):
        self.model = model

    def __call__(self, prompts: list[Text], pairs: list[tuple[str, str]]) -> list[float | None]:
        n = len(pairs)
        duels = [duel_text(a, b) for a, b in pairs] + [duel_text(b, a) for a, b in pairs]
        logits = torch.tensor(self.model(list(prompts) * 2, duels)).sigmoid()
        return ((logits[:n] + 1 - logits[n:]) / 2).tolist()


class FunctionReward:
    """`module:function`, called as function(prompt, completion) -> float for each sample, or as
    function(prompt, completion, fields) when it takes a third argument: the prompt row's other fields,
    e.g. the reference answer a verifier checks against."""

    def __init__(self, spec: str, option: str = "online.reward_function"):
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise UserError(f"{option}={spec!r}: expected 'module:function'")
        try:
            self.function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"{option}={spec!r}: cannot import it ({exc})") from None
        self.spec = spec
        self.wants_fields = len(inspect.signature(self.function).parameters) >= 3

    def __call__(
        self, prompts: list[Text], completions: list[str], fields: list[dict] | None = None
    ) -> list[float]:
        values = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            args = (
                (prompt, completion, (fields[i] if fields else None) or {})
                if self.wants_fields
                else (prompt, completion)
            )
            value = self.function(*args)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserError(f"{self.spec} returned {value!r}; expected a number")
            values.append(float(value))
        return values


def check_reward(cfg: OnlineConfig) -> None:
    """Fail on a bad reward setting before any work is done (or any run directory created)."""
    reward_source(cfg)


def reward_source(cfg: OnlineConfig) -> FunctionReward | str:
    """The reward function, or the reward model's path (or `gpo:RUN:CONTEXT`), of a checked reward setting."""
    model, function = cfg.reward_model, cfg.reward_function
    if function and not model:
        return FunctionReward(function)
    if model and not function and model.startswith(GPO_PREFIX):
        GPOReward.check(model)  # the module and the group's examples, read without the LLM
        return model
    if model and not function:
        if looks_local(model) and not Path(model).expanduser().exists():
            raise UserError(f"online.reward_model={model}: no such directory (train a reward model first)")
        return model
    raise UserError("online: set exactly one of online.reward_model and online.reward_function")


def load_reward(cfg: OnlineConfig, device: torch.device, bf16: bool) -> RewardFn:
    source = reward_source(cfg)
    if isinstance(source, FunctionReward):
        return source
    if source.startswith(GPO_PREFIX):  # embeds at the precision it was trained with
        return GPOReward.from_spec(source, device)
    return ModelReward.load(source, device, bf16)


def score_file(
    model: str,
    data: str,
    output: str,
    max_length: int = 1024,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> int:
    """Score every {prompt, completion} row of `data` with a trained reward model; write the rows, each with
    a "score" field, to `output` (JSONL). Returns the number of rows."""
    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    rows = read_rows(data, "train")
    examples = [parse_example(row, "completions") for row in rows]
    reward_model, tokenizer = load_reward_model(ModelConfig(name=model, trust_remote_code=trust_remote_code))
    reward_model.eval()
    scorer = ScalarScorer(reward_model, score_head(reward_model))
    encoder = Encoder(tokenizer, max_length, max_length // 2)
    items = [encoder.encode(e.prompt, e.completion, None, e.location) for e in examples]
    scores = score_in_batches(
        scorer,
        [i.prompt_ids for i in items],
        [i.completion_ids for i in items],
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )
    write_jsonl(out, ({**row.values, "score": value} for row, value in zip(rows, scores)))
    return len(rows)
