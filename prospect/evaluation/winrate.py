"""Win rates of one model against another on the same prompts, with intervals, and how far judges agree.

- A preference per prompt: 1 when the model's completion is judged better than the baseline's, 0 when worse,
  1/2 for a tie (a scoring judge gave both the same score, or an AI judge's verdict flipped with the order).
- The win rate is the mean preference: ties count half. Its 95% interval is the percentile bootstrap over
  prompts (`BOOTSTRAP` resamples of the prompts with replacement, seeded, the 2.5th and 97.5th percentiles).
- The length-controlled win rate, after AlpacaEval's LC (Dubois et al. 2024), without its per-instruction
  term: a logistic regression of the preference on the standardized length difference,
  P(win) = sigmoid(theta + phi * tanh((len_model - len_baseline) / sd)), fit by maximum likelihood with the
  preference as a fractional target and a ridge penalty (`RIDGE` * phi^2 / 2) on phi only; the LC win rate
  is the predicted win rate at zero length difference, sigmoid(theta). Lengths are in characters, so models
  with different tokenizers compare; sd is the standard deviation of the differences over all prompts. With
  equal lengths everywhere the fit gives phi = 0 and the LC rate equals the raw rate. Its interval refits on
  the same bootstrap resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP = 2000
RIDGE = 1.0
LEVEL = 0.95


def preferences(scores: list[float], baseline: list[float]) -> list[float]:
    """A scoring judge's per-prompt preference for the model: 1 above the baseline's score, 0 below, 1/2 tied."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores, baseline)]


@dataclass
class WinRate:
    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def resamples(n: int, count: int, seed: int) -> np.ndarray:
    """`count` bootstrap resamples of n prompts: a [count, n] array of indices, the same for a given seed."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def interval(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def win_rate(prefs: list[float], count: int = BOOTSTRAP, seed: int = 0) -> WinRate:
    """The mean preference (ties half) and its percentile-bootstrap 95% interval over prompts."""
    if not prefs:
        return WinRate(math.nan, math.nan, math.nan, 0, 0, 0)
    y = np.asarray(prefs, dtype=float)
    low, high = interval(y[resamples(len(y), count, seed)].mean(axis=1))
    return WinRate(
        float(y.mean()), low, high, int((y > 0.5).sum()), int((y == 0.5).sum()), int((y < 0.5).sum())
    )


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def logistic_fit(z: np.ndarray, y: np.ndarray, ridge: float = RIDGE) -> tuple[float, float]:
    """(theta, phi) maximizing sum y log p + (1 - y) log(1 - p) - ridge * phi^2 / 2, p = sigmoid(theta + phi z),
    by Newton's method (the objective is concave; steps are capped so that none overshoots far)."""
    if np.all(y == y[0]) and y[0] in (0.0, 1.0):  # nothing to explain; theta would run off to infinity
        return (math.inf if y[0] else -math.inf), 0.0
    x = np.column_stack([np.ones_like(z), z])
    penalty = np.diag([0.0, ridge])
    theta = np.zeros(2)
    for _ in range(100):
        p = sigmoid(x @ theta)
        gradient = x.T @ (y - p) - penalty @ theta
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        step *= min(1.0, 5.0 / max(float(np.abs(step).max()), 1e-300))
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def length_features(lengths: list[float], baseline_lengths: list[float]) -> np.ndarray:
    """tanh of the length differences over their standard deviation (0 everywhere when they never vary)."""
    diff = np.asarray(lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    sd = float(diff.std())
    return np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)


def lc_rate(z: np.ndarray, y: np.ndarray) -> float:
    theta, _ = logistic_fit(z, y)
    return float(sigmoid(np.asarray(theta)))


def lc_win_rate(
    prefs: list[float],
    lengths: list[float],
    baseline_lengths: list[float],
    count: int = BOOTSTRAP,
    seed: int = 0,
) -> dict[str, float]:
    """{rate, low, high, length_coef}: the win rate at zero length difference (module docstring) and its
    bootstrap interval; length_coef is phi, how much longer-than-baseline completions win more."""
    if not prefs:
        return {"rate": math.nan, "low": math.nan, "high": math.nan, "length_coef": math.nan}
    y = np.asarray(prefs, dtype=float)
    z = length_features(lengths, baseline_lengths)
    theta, phi = logistic_fit(z, y)
    boot = np.array([lc_rate(z[idx], y[idx]) for idx in resamples(len(y), count, seed)])
    low, high = interval(boot)
    return {"rate": float(sigmoid(np.asarray(theta))), "low": low, "high": high, "length_coef": phi}


def ranks(values: list[float]) -> np.ndarray:
    """Ranks from 0, tied values sharing their mean rank (as Spearman's correlation takes them)."""
    v = np.asarray(values, dtype=float)
    order = np.empty(len(v))
    order[v.argsort(kind="stable")] = np.arange(len(v))
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=order) / counts)[inverse]


def pearson(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Pearson's r; NaN when either side is constant (or there are fewer than two values)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def spearman(a: list[float], b: list[float]) -> float:
    return pearson(ranks(a), ranks(b)) if len(a) >= 2 else math.nan


def agreement(margins_a: list[float | None], margins_b: list[float | None]) -> dict[str, float]:
    """Two judges on the same prompts, given as margins (> 0: the model's completion is better, 0: a tie):
    the share of prompts where their verdicts (win, tie, loss) agree, and Spearman's and Pearson's correlation
    of the margins. Prompts either judge left unjudged (None) are dropped."""
    both = [(a, b) for a, b in zip(margins_a, margins_b) if a is not None and b is not None]
    if not both:
        return {"verdict_agreement": math.nan, "spearman": math.nan, "pearson": math.nan, "prompts": 0}
    a, b = [x for x, _ in both], [y for _, y in both]
    same = sum(np.sign(x) == np.sign(y) for x, y in both)
    return {
        "verdict_agreement": float(same) / len(both),
        "spearman": spearman(a, b),
        "pearson": pearson(a, b),
        "prompts": len(both),
    }
