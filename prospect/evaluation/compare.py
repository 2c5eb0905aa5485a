"""The numbers of `prospect eval`, from the samples and what the judges said of them: for each checkpoint
and judge the mean score, the win rate against the baseline on the same prompts with its bootstrap interval,
the length-controlled win rate (evaluation/winrate.py), and the KL, length and task accuracy of its samples;
with two or more judges, how far they agree. Written as JSON and printed as a table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

from prospect.data.formats import Example
from prospect.data.tasks import exact_match
from prospect.evaluation.ai_judges import prompt_text
from prospect.evaluation.heldout import HeldOutResult, stderr
from prospect.evaluation.winrate import agreement, lc_win_rate, preferences, win_rate


@dataclass
class Side:
    """A model's completions of the prompts (heldout.evaluate's result) and the judges' scores of them. An AI
    judge scores no completion alone: a checkpoint holds its preference over the baseline, per prompt."""

    name: str
    path: str
    result: HeldOutResult
    scores: dict[str, list[float]] = field(default_factory=dict)  # scoring judges
    preferences: dict[str, list[float | None]] = field(default_factory=dict)  # AI judges, None: unreadable

    @property
    def texts(self) -> list[str]:
        return [s["completion"] for s in self.result.samples]


def mean_stderr(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values) if values else math.nan, "stderr": stderr(values)}


def judged(model: Side, baseline: Side, judge: str) -> tuple[list[float | None], list[float | None]]:
    """(the model's scores, the baseline's) per prompt. An AI judge's are its preference p for the model and
    1 - p for the baseline, so its mean score is the model's win rate."""
    if judge in model.preferences:
        prefs = model.preferences[judge]
        return list(prefs), [None if p is None else 1 - p for p in prefs]
    return list(model.scores[judge]), list(baseline.scores[judge])


def margins(model: Side, baseline: Side, judge: str) -> list[float | None]:
    """Per prompt, how much the judge prefers the model: score - baseline score (AI judges: p - (1 - p))."""
    ours, theirs = judged(model, baseline, judge)
    return [None if a is None or b is None else a - b for a, b in zip(ours, theirs)]


def accuracy(texts: list[str], prompts: list[Example]) -> list[float] | None:
    """Exact match against each prompt's `answer` field (tasks such as arithmetic); None without answers."""
    if not prompts or not all(p.fields and "answer" in p.fields for p in prompts):
        return None
    return [exact_match(p.prompt, t, p.fields or {}) for p, t in zip(prompts, texts)]


def checkpoint_summary(
    model: Side, baseline: Side, judges: list[str], prompts: list[Example], bootstrap: int, seed: int
) -> dict[str, Any]:
    """One checkpoint's entry of the JSON (the schema in docs: README's `prospect eval`)."""
    chars = [len(t) for t in model.texts]
    baseline_chars = [len(t) for t in baseline.texts]
    entry: dict[str, Any] = {
        "name": model.name,
        "path": model.path,
        "baseline": {"name": baseline.name, "path": baseline.path},
        "judge": {},
        "baseline_judge": {},
        "win_rate": {},
        "lc_win_rate": {},
    }
    scores = {j: judged(model, baseline, j) for j in judges}
    for judge in judges:
        ours, theirs = scores[judge]
        kept: list[int] = []
        a_scores: list[float] = []
        b_scores: list[float] = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a is not None and b is not None:  # an AI judge's unreadable verdicts are left out
                kept.append(i)
                a_scores.append(a)
                b_scores.append(b)
        prefs = preferences(a_scores, b_scores)  # an AI judge's p in {0, 1/2, 1} against 1 - p gives p
        entry["judge"][judge] = mean_stderr(a_scores)
        entry["baseline_judge"][judge] = mean_stderr(b_scores)
        entry["win_rate"][judge] = {
            **win_rate(prefs, bootstrap, seed).to_dict(),
            "unjudged": len(ours) - len(kept),
        }
        entry["lc_win_rate"][judge] = lc_win_rate(
            prefs, [chars[i] for i in kept], [baseline_chars[i] for i in kept], bootstrap, seed
        )
    result, base = model.result, baseline.result
    entry["kl"] = {"mean": result.kl_mean, "stderr": result.kl_stderr}
    entry["length"] = {
        "mean": result.length_mean,
        "baseline_mean": base.length_mean,
        "unit": "tokens",
        "chars_mean": statistics.fmean(chars) if chars else math.nan,
        "baseline_chars_mean": statistics.fmean(baseline_chars) if baseline_chars else math.nan,
    }
    correct, baseline_correct = accuracy(model.texts, prompts), accuracy(baseline.texts, prompts)
    entry["accuracy"] = mean_stderr(correct) if correct is not None else None
    entry["baseline_accuracy"] = mean_stderr(baseline_correct) if baseline_correct is not None else None
    entry["agreement"] = judge_agreement([(model, baseline)], judges)
    entry["samples"] = [
        {
            "prompt": prompt_text(p.prompt),
            "completion": ours_text,
            "baseline": theirs_text,
            "scores": {j: scores[j][0][i] for j in judges},
            "baseline_scores": {j: scores[j][1][i] for j in judges},
            "tokens": model.result.samples[i]["tokens"],
            "baseline_tokens": baseline.result.samples[i]["tokens"],
        }
        for i, (p, ours_text, theirs_text) in enumerate(zip(prompts, model.texts, baseline.texts))
    ]
    return entry


def judge_agreement(pairs: list[tuple[Side, Side]], judges: list[str]) -> dict[str, dict[str, float]]:
    """For each two judges ("A~B"), over the prompts of every (model, baseline) pair: the share of prompts on
    which their verdicts (model better, tie, baseline better) agree, and the Spearman and Pearson correlations
    of their margins (score - baseline score; an AI judge's: p - (1 - p) for its preference p)."""
    out = {}
    for a, b in combinations(judges, 2):
        margins_a = [m for model, base in pairs for m in margins(model, base, a)]
        margins_b = [m for model, base in pairs for m in margins(model, base, b)]
        out[f"{a}~{b}"] = agreement(margins_a, margins_b)
    return out


def finite(value: Any) -> Any:
    """NaN and infinities as None, so the JSON is standard (browsers' JSON.parse rejects NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def number(value: float | None, form: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, form)


def table(report: dict[str, Any]) -> str:
    """The printed summary: a row per checkpoint and judge, then the judges' agreement."""
    rows = [
        [
            "checkpoint", "judge", "score ± s.e.", "baseline", "win rate [95% CI]", "LC win rate [95% CI]",
            "KL ± s.e. (nats)", "tokens (baseline)", "accuracy",
        ]
    ]  # fmt: skip
    for entry in report["checkpoints"]:
        for k, judge in enumerate(report["judges"]):
            ours, theirs = entry["judge"][judge], entry["baseline_judge"][judge]
            win, lc = entry["win_rate"][judge], entry["lc_win_rate"][judge]
            kl, length, acc = entry["kl"], entry["length"], entry["accuracy"]
            rows.append(
                [
                    entry["name"] if k == 0 else "",
                    judge,
                    f"{number(ours['mean'], '+.3f')} ± {number(ours['stderr'], '.3f')}",
                    f"{number(theirs['mean'], '+.3f')} ± {number(theirs['stderr'], '.3f')}",
                    f"{number(win['rate'], '.3f')} [{number(win['low'], '.3f')}, {number(win['high'], '.3f')}]",
                    f"{number(lc['rate'], '.3f')} [{number(lc['low'], '.3f')}, {number(lc['high'], '.3f')}]",
                    f"{number(kl['mean'], '.3f')} ± {number(kl['stderr'], '.3f')}" if k == 0 else "",
                    f"{number(length['mean'], '.1f')} ({number(length['baseline_mean'], '.1f')})"
                    if k == 0
                    else "",
                    f"{number(acc['mean'], '.3f')} ± {number(acc['stderr'], '.3f')}"
                    if k == 0 and acc
                    else "",
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"{report['prompts']['count']} prompts from {report['prompts']['source']}; baseline: "
        f"{report['baseline']['name']} ({report['baseline']['path']})",
        *("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows),
    ]
    for pair, values in report["agreement"].items():
        lines.append(
            f"judges {pair}: verdicts agree on {number(values['verdict_agreement'], '.1%')} of "
            f"{values['prompts']} prompts; Spearman {number(values['spearman'], '+.2f')}, "
            f"Pearson {number(values['pearson'], '+.2f')} of their margins"
        )
    return "\n".join(lines)
