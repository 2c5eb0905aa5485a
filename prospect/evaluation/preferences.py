"""How well a preference source predicts held-out human comparisons: accuracy, and calibration (expected
calibration error, Brier score, a reliability curve). Any source that gives P(first > second | prompt) is
measured the same way: a pairwise preference model, a reward model read as Bradley-Terry, the VADER lexicon,
an LLM judge (see judges.py, `NamedJudge.prefer`).

Each held-out pair is shown in an order drawn by the seed, so "the first is preferred" is true about half the
time and a source that always says 0.5 scores an accuracy of 0.5 and is perfectly calibrated at its one
value. Ties (P = 0.5 exactly) count half a right answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from prospect.data.convert import completion_text
from prospect.data.formats import Pair, Text

KIND = (
    "preferences"  # the "kind" of a `prospect preferences` file, which `prospect report --preferences` checks
)
PreferFn = Callable[[list[Text], list[tuple[str, str]]], list[float | None]]  # P(first > second), or None


@dataclass
class Reliability:
    low: float
    high: float
    mean_probability: float  # the source's mean P(first > second) in the bin
    frequency: float  # how often the first was preferred there
    count: int


@dataclass
class PreferenceQuality:
    comparisons: int = 0  # pairs judged
    unjudged: int = 0  # pairs the source gave no answer for (an unreadable verdict)
    accuracy: float | None = None
    accuracy_stderr: float | None = None
    ece: float | None = None  # sum over bins of (count / n) |frequency - mean probability|
    brier: float | None = None  # mean (P - outcome)^2
    bins: list[Reliability] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def shown_in_random_order(
    pairs: list[Pair], seed: int
) -> tuple[list[Text], list[tuple[str, str]], list[bool]]:
    """(prompts, (first, second), whether the first is the preferred one), each pair's order drawn by `seed`."""
    rng = random.Random(seed)
    prompts, shown, outcomes = [], [], []
    for p in pairs:
        chosen, rejected = completion_text(p.chosen), completion_text(p.rejected)
        first_wins = rng.random() < 0.5
        prompts.append(p.prompt)
        shown.append((chosen, rejected) if first_wins else (rejected, chosen))
        outcomes.append(first_wins)
    return prompts, shown, outcomes


def quality(probabilities: list[float | None], outcomes: list[bool], bins: int = 10) -> PreferenceQuality:
    """Accuracy (ties half) with its standard error, ECE over `bins` equal-width bins, Brier score."""
    judged = [(p, o) for p, o in zip(probabilities, outcomes) if p is not None]
    result = PreferenceQuality(comparisons=len(judged), unjudged=len(outcomes) - len(judged))
    if not judged:
        return result
    n = len(judged)
    right = [1.0 if (p > 0.5) == o and p != 0.5 else 0.5 if p == 0.5 else 0.0 for p, o in judged]
    result.accuracy = sum(right) / n
    variance = sum((r - result.accuracy) ** 2 for r in right) / max(n - 1, 1)
    result.accuracy_stderr = math.sqrt(variance / n)
    result.brier = sum((p - o) ** 2 for p, o in judged) / n
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        inside = [(p, o) for p, o in judged if low <= p < high or (b == bins - 1 and p == 1.0)]
        if not inside:
            continue
        mean_p = sum(p for p, _ in inside) / len(inside)
        frequency = sum(o for _, o in inside) / len(inside)
        ece += len(inside) / n * abs(frequency - mean_p)
        result.bins.append(Reliability(low, high, mean_p, frequency, len(inside)))
    result.ece = ece
    return result


def measure(prefer: PreferFn, pairs: list[Pair], seed: int, bins: int = 10) -> PreferenceQuality:
    """`prefer` on the held-out `pairs`, each shown in a random order, against what people preferred."""
    prompts, shown, outcomes = shown_in_random_order(pairs, seed)
    return quality(prefer(prompts, shown), outcomes, bins)


def bradley_terry(first: float, second: float) -> float:
    """A reward model's scores as a preference: sigmoid(r(first) - r(second))."""
    return 1.0 / (1.0 + math.exp(-(first - second))) if first - second > -700 else 0.0
