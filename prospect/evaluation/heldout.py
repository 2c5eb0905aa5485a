"""Held-out evaluation of a policy: sample on prompts training never saw, judge the samples, and
estimate KL(pi || pi_ref) on them as the mean of log pi(y|x) - log pi_ref(y|x) over y ~ pi."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from prospect.config import DataConfig, EvalConfig, OnlineConfig
from prospect.data.batching import Sequences, pad
from prospect.data.pipeline import load_eval_prompts
from prospect.data.tokenize import EncodedPrompt, Encoder
from prospect.evaluation.judges import Judge, get_judge
from prospect.io import write_text_atomic
from prospect.models.sampling import HFSampler, SamplingParams
from prospect.progress import Progress


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


class PolicyScorer(Protocol):
    """What held-out evaluation needs of the trained module: a TokenScorer, or PPO's actor-critic."""

    @property
    def model(self) -> nn.Module: ...  # the causal LM, to sample from

    def sequence_logps(self, seqs: Sequences) -> torch.Tensor: ...


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: list[EncodedPrompt],
    policy_logps: Callable[[Sequences], torch.Tensor],
    reference_logps: Callable[[Sequences], torch.Tensor] | None,
    judge: Judge | None,
    cfg: EvalConfig,
    seed: int,
    bf16: bool,
    verbose: bool = False,
    label: str = "",
) -> HeldOutResult:
    """Sample each prompt once, judge the samples, and measure the KL to the reference on them (none when
    `reference_logps` is None: the model is the reference). Each sample records its completion's tokens."""
    started = time.perf_counter()
    prompts = [it.prompt_ids for it in items]
    sampler = HFSampler(model, tokenizer, batch_size=cfg.batch_size, bf16=bf16, decoder=cfg.sampler)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
    )
    with Progress(f"held-out samples, {label}", len(prompts), "prompts", show=verbose) as progress:
        completions = [s[0].token_ids for s in sampler.generate(prompts, params, progress)]
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    kls: list[float] = []
    if reference_logps is not None:  # none: the model is the reference
        scoring = Progress(f"KL on the samples, {label}", len(prompts), "samples", show=verbose)
        with torch.no_grad(), scoring as progress:
            for start in range(0, len(prompts), cfg.batch_size):
                keep = [i for i in range(start, min(start + cfg.batch_size, len(prompts))) if completions[i]]
                if keep:
                    seqs = pad(
                        [prompts[i] for i in keep], [completions[i] for i in keep], tokenizer.pad_token_id
                    )
                    seqs = seqs.to(next(model.parameters()).device)
                    kls.extend((policy_logps(seqs) - reference_logps(seqs)).tolist())
                progress.update(min(cfg.batch_size, len(prompts) - start))
    scores = judge(texts, items) if judge else None
    result = HeldOutResult(
        judge_mean=statistics.fmean(scores) if scores else None,
        judge_stderr=stderr(scores) if scores else None,
        positive_fraction=sum(s > 0.05 for s in scores) / len(scores) if scores else None,
        kl_mean=statistics.fmean(kls) if kls else 0.0,
        kl_stderr=stderr(kls),
        length_mean=statistics.fmean(len(c) for c in completions),
        samples=[
            {
                "prompt": tokenizer.decode(p),
                "completion": t,
                "score": None if scores is None else scores[i],
                "tokens": len(completions[i]),
            }
            for i, (p, t) in enumerate(zip(prompts, texts))
        ],
    )
    if verbose:
        judged = f"judge {result.judge_mean:+.3f} ± {result.judge_stderr:.3f}, " if scores else ""
        kl = f"KL {result.kl_mean:.3f} ± {result.kl_stderr:.3f}, " if reference_logps else ""
        print(
            f"{label}: {judged}{kl}{result.length_mean:.1f} tokens ({time.perf_counter() - started:.0f}s)",
            flush=True,
        )
        for sample_ in result.samples[: cfg.show]:
            score = f" [{sample_['score']:+.2f}]" if sample_["score"] is not None else ""
            print(f"  -> {sample_['completion'].strip()[:160]!r}{score}", flush=True)
    return result


def print_report(before: HeldOutResult, after: HeldOutResult, path: Path) -> None:
    """The before/after table, also written to `path` as JSON."""
    rows = [
        ("held-out judge score (mean)", before.judge_mean, after.judge_mean),
        ("positive fraction (> 0.05)", before.positive_fraction, after.positive_fraction),
        ("KL(policy || reference), nats", before.kl_mean, after.kl_mean),
        ("completion length, tokens", before.length_mean, after.length_mean),
    ]
    print("\n" + f"{'':34}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        if b is not None and a is not None:
            print(f"{name:34}{b:>10.3f}{a:>10.3f}")
    if before.judge_mean is not None and after.judge_mean is not None:
        change = after.judge_mean - before.judge_mean
        spread = math.hypot(before.judge_stderr or 0.0, after.judge_stderr or 0.0)  # set with each mean
        print(f"change in judge score: {change:+.3f} (± {spread:.3f}) at a KL of {after.kl_mean:.3f} nats")
    summary = {"before": before.summary(), "after": after.summary()}
    write_text_atomic(path, json.dumps(summary, indent=1))


def stderr(values: list[float] | None) -> float:
    if not values or len(values) < 2:
        return 0.0
    return statistics.stdev(values) / math.sqrt(len(values))


class PolicyEvaluation:
    """Before and after training: sample the policy on held-out prompts, judge the samples and measure the
    KL to the reference on them. `prompt_suffix` ends each prompt (CSFT's desirable control token)."""

    result_type = HeldOutResult

    def __init__(
        self,
        data: DataConfig,
        cfg: EvalConfig,
        online: OnlineConfig,
        encoder: Encoder,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        bf16: bool,
        seed: int,
        prompt_suffix: list[int] | None = None,
        verbose: bool = True,
    ):
        self.data, self.cfg, self.online, self.encoder, self.tokenizer = data, cfg, online, encoder, tokenizer
        self.device, self.bf16, self.seed = device, bf16, seed
        self.prompt_suffix, self.verbose = prompt_suffix, verbose
        self.prompts: list[EncodedPrompt] | None = None

    def __call__(
        self, scorer: PolicyScorer, reference: Callable[[Sequences], torch.Tensor], when: str
    ) -> HeldOutResult:
        """`scorer` is the policy's TokenScorer (unwrapped), `reference` the live reference."""
        if self.prompts is None:  # read once: the run evaluates before, after, and every eval.every steps
            self.prompts = load_eval_prompts(self.data, self.encoder, self.cfg.num_prompts)
        prompts = self.prompts
        if self.prompt_suffix:
            prompts = [dataclasses.replace(p, prompt_ids=p.prompt_ids + self.prompt_suffix) for p in prompts]
        when = f"{when} training" if when in ("before", "after") else when  # or "at step N"
        if self.verbose:
            print(f"evaluating {when} on {len(prompts)} held-out prompts ...", flush=True)
        return evaluate(
            scorer.model,
            self.tokenizer,
            prompts,
            scorer.sequence_logps,
            reference,
            get_judge(self.cfg.judge, self.online, self.device, self.bf16),
            self.cfg,
            seed=self.seed,
            bf16=self.bf16,
            verbose=self.verbose,
            label=when,
        )

    def report(self, before: HeldOutResult, after: HeldOutResult, path: Path) -> None:
        if self.verbose:
            print_report(before, after, path)
