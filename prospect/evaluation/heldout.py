"""Held-out evaluation of a policy: sample on prompts training never saw, judge the samples, and
estimate KL(pi || pi_ref) on them as the mean of log pi(y|x) - log pi_ref(y|x) over y ~ pi."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prospect.config import EvalConfig
from prospect.data.batching import Sequences, pad
from prospect.evaluation.generation import sample
from prospect.evaluation.judges import Judge


@dataclass
class HeldOutResult:
    judge_mean: float | None
    judge_stderr: float | None
    positive_fraction: float | None
    kl_mean: float
    kl_stderr: float
    length_mean: float
    samples: list[dict]

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "samples"}


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    policy_logps: Callable[[Sequences], torch.Tensor],
    reference_logps: Callable[[Sequences], torch.Tensor],
    judge: Judge | None,
    cfg: EvalConfig,
    seed: int,
    bf16: bool,
) -> HeldOutResult:
    completions = sample(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=cfg.batch_size,
        seed=seed,
        bf16=bf16,
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    kls: list[float] = []
    with torch.no_grad():
        for start in range(0, len(prompts), cfg.batch_size):
            idx = range(start, min(start + cfg.batch_size, len(prompts)))
            keep = [i for i in idx if completions[i]]
            if not keep:
                continue
            seqs = pad([prompts[i] for i in keep], [completions[i] for i in keep], tokenizer.pad_token_id)
            seqs = seqs.to(next(model.parameters()).device)
            kls.extend((policy_logps(seqs) - reference_logps(seqs)).tolist())
    scores = judge(texts) if judge else None
    return HeldOutResult(
        judge_mean=statistics.fmean(scores) if scores else None,
        judge_stderr=stderr(scores) if scores else None,
        positive_fraction=sum(s > 0.05 for s in scores) / len(scores) if scores else None,
        kl_mean=statistics.fmean(kls) if kls else 0.0,
        kl_stderr=stderr(kls),
        length_mean=statistics.fmean(len(c) for c in completions),
        samples=[
            {"prompt": tokenizer.decode(p), "completion": t, "score": None if scores is None else scores[i]}
            for i, (p, t) in enumerate(zip(prompts, texts))
        ],
    )


def stderr(values: list[float] | None) -> float:
    if not values or len(values) < 2:
        return 0.0
    return statistics.stdev(values) / math.sqrt(len(values))
