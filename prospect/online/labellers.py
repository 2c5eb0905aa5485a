"""Labellers turn sampled completions into training data, behind one interface.

Scores come from a reward model, a Python reward or verifier function (`prospect/rewards.py`), or an AI judge
that rates each completion. They become:
- binary labels (KTO): desirable when the score is above a threshold that is fixed, or the mean or median of
  the prompt's own samples; undesirable rows can be capped at a ratio to the desirable ones;
- pairs (DPO): best vs worst, a random pair, or a random pair at least `min_gap` apart;
- filtered completions (ReST, ReST-EM): those above a threshold.
A judge labels through `JudgeLabeller`, the AI judge of evaluation/ai_judges.py (both orders of each pair,
averaged; unparsable verdicts counted, never fatal) with one judged pair per prompt.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from prospect.data.convert import prompt_key
from prospect.data.formats import Text
from prospect.evaluation.ai_judges import AIJudge


@dataclass
class Group:
    """One prompt's sampled completions and their scores."""

    prompt: Text
    completions: list[str]
    scores: list[float] = field(default_factory=list)
    fields: dict | None = None


def binary_labels(groups: list[Group], threshold: str = "fixed", value: float = 0.0) -> list[dict]:
    """{prompt, completion, label}: desirable when the score is above the threshold (`fixed` at `value`,
    or the `mean` / `median` of the prompt's samples). Ties with a mean or median threshold are left out."""
    rows = []
    for group in groups:
        cut = {
            "fixed": value,
            "mean": statistics.fmean(group.scores) if group.scores else 0.0,
            "median": statistics.median(group.scores) if group.scores else 0.0,
        }[threshold]
        for completion, score in zip(group.completions, group.scores):
            if threshold != "fixed" and score == cut:
                continue
            rows.append(
                {"prompt": group.prompt, "completion": completion, "label": score > cut, "score": score}
            )
    return rows


def balance_labels(rows: list[dict], ratio: float, rng: random.Random) -> list[dict]:
    """Keep every desirable row and at most `ratio` undesirable rows per desirable one (ratio 0 keeps all).
    Undesirable rows whose prompt also has a desirable one are kept first: they contrast right and wrong
    answers to the same prompt. Rows keep their original order."""
    desirable = sum(r["label"] for r in rows)
    budget = round(ratio * desirable)
    undesirable = [i for i, r in enumerate(rows) if not r["label"]]
    if ratio <= 0 or len(undesirable) <= budget:
        return rows
    contrasted = {prompt_key(r["prompt"]) for r in rows if r["label"]}
    rng.shuffle(undesirable)
    undesirable.sort(key=lambda i: prompt_key(rows[i]["prompt"]) not in contrasted)
    keep = set(undesirable[:budget])
    return [r for i, r in enumerate(rows) if r["label"] or i in keep]


def select_pairs(
    groups: list[Group], selection: str = "best_worst", min_gap: float = 0.0, rng: random.Random | None = None
) -> list[dict]:
    """{prompt, chosen, rejected}: one pair per prompt whose scores differ (by at least `min_gap`)."""
    rng = rng or random.Random(0)
    rows = []
    for group in groups:
        scored = list(zip(group.completions, group.scores))
        if len(scored) < 2:
            continue
        if selection == "best_worst":
            (lo, s_lo), (hi, s_hi) = min(scored, key=lambda x: x[1]), max(scored, key=lambda x: x[1])
            candidates = [((hi, s_hi), (lo, s_lo))]
        else:
            candidates = [
                (a, b) if a[1] > b[1] else (b, a) for i, a in enumerate(scored) for b in scored[i + 1 :]
            ]
            rng.shuffle(candidates)
        for (chosen, s_c), (rejected, s_r) in candidates:
            gap = s_c - s_r
            if gap > 0 and gap >= (min_gap if selection == "min_gap" else 0.0) and chosen != rejected:
                rows.append({"prompt": group.prompt, "chosen": chosen, "rejected": rejected, "margin": gap})
                break
    return rows


def filtered(groups: list[Group], threshold: float) -> list[dict]:
    """{prompt, completion}: the completions scoring at least `threshold` (ReST's Improve, ReST-EM's E-step)."""
    return [
        {"prompt": g.prompt, "completion": c, "score": s}
        for g in groups
        for c, s in zip(g.completions, g.scores)
        if s >= threshold
    ]


class JudgeLabeller(AIJudge):
    """An AI judge that also labels a round's samples: one judged pair per prompt."""

    def judged_pairs(self, groups: list[Group], rng: random.Random) -> list[dict]:
        """One pair per prompt from two random samples, labelled by the judge in both orders."""
        chosen = [(g, rng.sample(range(len(g.completions)), 2)) for g in groups if len(g.completions) >= 2]
        verdicts = self.compare(
            [g.prompt for g, _ in chosen], [(g.completions[i], g.completions[j]) for g, (i, j) in chosen]
        )
        rows = []
        for (group, (i, j)), p in zip(chosen, verdicts):
            if p is None or p == 0.5:
                continue  # unparsable, or the judge contradicted itself when the order was swapped
            win, lose = (i, j) if p > 0.5 else (j, i)
            rows.append(
                {
                    "prompt": group.prompt,
                    "chosen": group.completions[win],
                    "rejected": group.completions[lose],
                }
            )
        return rows
