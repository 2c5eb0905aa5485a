"""Held-out evaluation of a reward model: how often it orders held-out comparisons as people did, and, on
rated data, how well its scores track the human ratings (Pearson r, sign agreement). A judge such as the
VADER lexicon gets the same measurements on the same texts, as a baseline."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prospect.config import DataConfig
from prospect.data.batching import pad
from prospect.data.convert import to_groups
from prospect.data.formats import Example, parse_rows
from prospect.data.sources import read_rows
from prospect.data.tokenize import Encoder
from prospect.errors import UserError
from prospect.evaluation.judges import Judge

ScoreFn = Callable[[list[list[int]], list[list[int]]], list[float]]


@dataclass
class RewardEval:
    pair_accuracy: float | None = None
    comparisons: int = 0
    pearson_r: float | None = None
    sign_accuracy: float | None = None
    rated: int = 0
    judge: dict = field(default_factory=dict)  # the same measurements for the baseline judge

    def rows(self) -> list[tuple[str, float | None, float | None]]:
        """(measure, model, judge) for printing."""
        return [
            ("pairwise accuracy", self.pair_accuracy, self.judge.get("pair_accuracy")),
            ("Pearson r with ratings", self.pearson_r, self.judge.get("pearson_r")),
            ("sign accuracy", self.sign_accuracy, self.judge.get("sign_accuracy")),
        ]


def score_in_batches(
    score: Callable,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = 32,
) -> list[float]:
    """Scores of (prompt, completion) token lists, longest first so batches hold similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
    out = [0.0] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = pad([prompts[i] for i in chunk], [completions[i] for i in chunk], pad_id).to(device)
            for i, value in zip(chunk, score(seqs).tolist()):
                out[i] = value
    return out


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
    rows = read_rows(cfg.eval or cfg.train, cfg.eval_split)[: limit or None]
    kind, parsed = parse_rows(rows, cfg.format)
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
            texts = [text_of(c) for g in groups for c in g.completions]
            result.judge["pair_accuracy"] = pair_accuracy(encoded, judge(texts, None))[0]
    if kind == "rated":
        examples: list[Example] = parsed
        items = [encoder.encode(e.prompt, e.completion, None, e.location) for e in examples]
        scores = score([i.prompt_ids for i in items], [i.completion_ids for i in items])
        ratings = [e.rating for e in examples]
        result.rated = len(ratings)
        result.pearson_r, result.sign_accuracy = agreement(scores, ratings, threshold)
        if judge:
            judged = judge([text_of(e.completion) for e in examples], None)
            result.judge["pearson_r"], result.judge["sign_accuracy"] = agreement(judged, ratings, 0.0)
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


def text_of(text) -> str:
    return text if isinstance(text, str) else " ".join(m["content"] for m in text if m["role"] == "assistant")


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
    import json
    from pathlib import Path

    from prospect.config import ModelConfig
    from prospect.models.reward import ScalarScorer, load_reward_model, score_head

    out = Path(output)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    rows = read_rows(data, "train")
    examples = [parse_example_row(row) for row in rows]
    reward_model, tokenizer = load_reward_model(ModelConfig(name=model, trust_remote_code=trust_remote_code))
    reward_model.eval()
    scorer = ScalarScorer(reward_model, score_head(reward_model))
    encoder = Encoder(tokenizer, max_length, max_length // 2)
    items = [encoder.encode(e.prompt, e.completion, None, e.location) for e in examples]
    scores = score_in_batches(
        lambda seqs: scorer.sequence_scores(seqs, tokenizer.pad_token_id),
        [i.prompt_ids for i in items],
        [i.completion_ids for i in items],
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as handle:
        for row, value in zip(rows, scores):
            handle.write(json.dumps({**row.values, "score": value}, default=str) + "\n")
    tmp.replace(out)
    return len(rows)


def parse_example_row(row) -> Example:
    """Any row with a prompt and a completion (labels and ratings, if present, are kept in the output only)."""
    from prospect.data.formats import parse_example

    return parse_example(row, "completions")
