"""Held-out evaluation of a reward model: how often it orders held-out comparisons as people did, and, on
rated data, how well its scores track the human ratings (Pearson r, sign agreement). A judge such as the
VADER lexicon gets the same measurements on the same texts, as a baseline."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prospect.config import DataConfig, EvalConfig
from prospect.data.convert import completion_text, to_groups, to_pairs
from prospect.data.formats import Example
from prospect.data.pipeline import read_heldout_parsed
from prospect.data.shapes import DataShape, sequences_of
from prospect.data.tokenize import Encoder
from prospect.errors import UserError
from prospect.evaluation.judges import Judge, NamedJudge, get_judge
from prospect.evaluation.preferences import PreferFn, measure
from prospect.models.scalar_head import ScalarScorer, score_in_batches
from prospect.rewards import ModelReward, PairwisePreference

ScoreFn = Callable[[list[list[int]], list[list[int]]], list[float]]


@dataclass
class RewardEval:
    pair_accuracy: float | None = None
    comparisons: int = 0
    pearson_r: float | None = None
    sign_accuracy: float | None = None
    rated: int = 0
    expected_calibration_error: float | None = None  # a pairwise preference model's, on the same pairs
    brier: float | None = None
    judge: dict = field(default_factory=dict)  # the same measurements for the baseline judge

    def rows(self) -> list[tuple[str, float | None, float | None]]:
        """(measure, model, judge) for printing."""
        return [
            ("pairwise accuracy", self.pair_accuracy, self.judge.get("pair_accuracy")),
            ("expected calibration error", self.expected_calibration_error, self.judge.get("ece")),
            ("Brier score", self.brier, self.judge.get("brier")),
            ("Pearson r with ratings", self.pearson_r, self.judge.get("pearson_r")),
            ("sign accuracy", self.sign_accuracy, self.judge.get("sign_accuracy")),
        ]


def evaluate_rewards(
    score: ScoreFn,
    encoder: Encoder,
    cfg: DataConfig,
    judge: Judge | None,
    threshold: float,
    limit: int,
    seed: int,
) -> RewardEval:
    """`score(prompts, completions)` scores token lists; `threshold` splits scores into positive/negative for
    sign accuracy (the mean training score, since Bradley-Terry scores have no natural zero)."""
    kind, parsed = read_heldout_parsed(cfg)
    parsed = parsed[: limit or None]
    result = RewardEval()
    try:
        groups = to_groups(kind, parsed, cfg, seed)
    except UserError:
        groups = []
    if groups:
        encoded = [encoder.encode_group(g.prompt, g.completions, g.location) for g in groups]
        flat = [(g.prompt_ids, c) for g in encoded for c in g.completions]
        scores = score([p for p, _ in flat], [c for _, c in flat])
        result.pair_accuracy, result.comparisons = pair_accuracy(encoded, scores)
        if judge:
            texts = [completion_text(c) for g in groups for c in g.completions]
            result.judge["pair_accuracy"] = pair_accuracy(encoded, judge(texts, None))[0]
    if kind == "rated":
        examples: list[Example] = parsed
        items = [encoder.encode(e.prompt, e.completion, None, e.location) for e in examples]
        scores = score([i.prompt_ids for i in items], [i.completion_ids for i in items])
        ratings = [e.require_rating() for e in examples]
        result.rated = len(ratings)
        result.pearson_r, result.sign_accuracy = agreement(scores, ratings, threshold)
        if judge:
            judged = judge([completion_text(e.completion) for e in examples], None)
            result.judge["pearson_r"], result.judge["sign_accuracy"] = agreement(judged, ratings, 0.0)
    return result


def evaluate_preferences(
    prefer: PreferFn, cfg: DataConfig, judge: Judge | None, limit: int, seed: int
) -> RewardEval:
    """A pairwise preference model on the held-out pairs (each shown in a random order): accuracy and
    calibration, beside the judge's scores read as a hard preference."""
    kind, parsed = read_heldout_parsed(cfg)
    pairs = to_pairs(kind, parsed, cfg, seed)[: limit or None]
    model = measure(prefer, pairs, seed)
    result = RewardEval(model.accuracy, model.comparisons)
    result.expected_calibration_error, result.brier = model.ece, model.brier
    if judge:
        baseline = measure(NamedJudge("judge", score=judge).prefer, pairs, seed)
        result.judge = {"pair_accuracy": baseline.accuracy, "ece": baseline.ece, "brier": baseline.brier}
    return result


def pair_accuracy(groups, scores: list[float]) -> tuple[float | None, int]:
    right = total = 0
    offset = 0
    for group in groups:
        k = len(group.completions)
        values = scores[offset : offset + k]
        offset += k
        for i in range(k):
            for j in range(i + 1, k):
                right += values[i] > values[j]
                total += 1
    return (right / total if total else None), total


def agreement(scores: list[float], ratings: list[float], threshold: float) -> tuple[float, float]:
    """(Pearson r, fraction where score > threshold agrees with rating > 0)."""
    r = statistics.correlation(scores, ratings) if len(set(scores)) > 1 else math.nan
    sign = sum((s > threshold) == (t > 0) for s, t in zip(scores, ratings)) / len(ratings)
    return r, sign


class RewardModelEvaluation:
    """Before and after training a reward model: accuracy on held-out comparisons and agreement with held-out
    ratings, beside the judge's. Bradley-Terry scores (ranked data) have no natural zero, so sign accuracy
    splits them at the mean score of (up to 256 of) the training lists."""

    result_type = RewardEval

    def __init__(
        self,
        data: DataConfig,
        cfg: EvalConfig,
        encoder: Encoder,
        pad_id: int,
        device: torch.device,
        seed: int,
        train_items: list,
        shape: DataShape,
        verbose: bool = True,
    ):
        self.data, self.cfg, self.encoder, self.pad_id, self.device = data, cfg, encoder, pad_id, device
        self.seed, self.train_items, self.shape, self.verbose = seed, train_items, shape, verbose

    def __call__(self, scorer: ScalarScorer, reference: object, when: str) -> RewardEval:
        def score(prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
            return score_in_batches(scorer, prompts, completions, self.pad_id, self.device)

        if self.shape == "duels":
            prefer = PairwisePreference(ModelReward(scorer, self.encoder, self.pad_id, self.device))
            judge = get_judge(self.cfg.judge)
            result = evaluate_preferences(prefer, self.data, judge, self.cfg.num_prompts, self.seed)
            return self.show(result, when)
        threshold = 0.0
        if self.shape == "ranked":
            threshold = statistics.fmean(score(*sequences_of(self.train_items[:256], self.shape)))
        result = evaluate_rewards(
            score,
            self.encoder,
            self.data,
            get_judge(self.cfg.judge),
            threshold,
            self.cfg.num_prompts,
            self.seed,
        )
        return self.show(result, when)

    def show(self, result: RewardEval, when: str) -> RewardEval:
        if self.verbose:
            judge = self.cfg.judge
            print(f"{when}: {'':24}{'model':>8}{judge if judge != 'none' else '':>8}", flush=True)
            for name, model_value, judge_value in result.rows():
                if model_value is not None:
                    shown = f"{judge_value:>8.3f}" if judge_value is not None else ""
                    print(f"  {name:28}{model_value:>8.3f}{shown}", flush=True)
        return result

    def report(self, before: RewardEval, after: RewardEval, path: object) -> None:
        """The rows were printed as each evaluation ran."""
