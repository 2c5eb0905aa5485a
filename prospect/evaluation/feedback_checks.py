"""The numbers of `prospect feedback`, as pure functions of plain lists: the raters' agreement (Krippendorff's
alpha with a bootstrap interval over items), each item's consensus, each named rater's bias, scale and
agreement with a rater-aware label model (Dawid-Skene), what a model would learn besides quality (an
unbalanced label, a length gap, texts repeated across the train and held-out splits, a few prolific raters or
prompts), and AI judges against the human consensus."""

from __future__ import annotations

import math
import re
import statistics
import zlib
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from prospect.data.convert import side_share
from prospect.data.sources import LABEL_NAMES

Value = Hashable  # one rater's rating (a number) or label (text)
Level = Literal["interval", "ordinal", "nominal"]  # Krippendorff's levels of measurement used here
OUTLIER_Z = 3.5  # a rater is an outlier past this modified z-score (Iglewicz & Hoaglin)
MIN_RATER_ITEMS = 5  # a rater's bias, scale and correlation need this many rated items
MIN_RATERS_TO_FLAG = 4  # fewer raters than this have no "typical" rater to stand out from
LENGTH_GAP_Z = 3.0  # a length gap this many standard errors from 0 is flagged
MINORITY_SHARE = 1 / 3  # a label rarer than this (2:1 or worse) is flagged as unbalanced
POSITIVE, NEGATIVE, ZERO = "positive", "negative", "zero"


# ----- agreement: Krippendorff's alpha ------------------------------------------------------------------


def value_counts(units: Sequence[Sequence[Value]]) -> tuple[np.ndarray, list[Value]]:
    """The (units x values) count matrix Krippendorff's alpha reads, and its value domain (sorted)."""
    domain = sorted({v for unit in units for v in unit}, key=sort_key)
    index = {v: i for i, v in enumerate(domain)}
    counts = np.zeros((len(units), len(domain)))
    for row, unit in enumerate(units):
        for value in unit:
            counts[row, index[value]] += 1
    return counts, domain


def sort_key(value: Value) -> tuple[int, float, str]:
    """Numbers in numeric order, then labels in text order."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def alpha(counts: np.ndarray, domain: Sequence[Value], level: Level) -> float | None:
    """Krippendorff's alpha of a count matrix (the `krippendorff` package), or None when the data cannot
    disagree: fewer than two units with two values, or a single value throughout."""
    import krippendorff

    counts = counts[counts.sum(axis=1) >= 2]
    if len(counts) < 2 or np.count_nonzero(counts.sum(axis=0)) < 2:
        return None
    numeric = all(isinstance(v, (int, float)) for v in domain)
    values = np.asarray(domain, dtype=float) if numeric else None  # labels: only the nominal level
    value = krippendorff.alpha(value_counts=counts, value_domain=values, level_of_measurement=level)
    return float(value) if math.isfinite(value) else None


def agreement(units: Sequence[Sequence[Value]], level: Level, resamples: int, seed: int) -> dict[str, Any]:
    """Alpha at `level` (interval, ordinal or nominal) with a percentile bootstrap 95% interval: the items
    with at least two values are resampled with replacement `resamples` times (seeded)."""
    counts, domain = value_counts(units)
    counts = counts[counts.sum(axis=1) >= 2]
    point = alpha(counts, domain, level)
    rng = np.random.default_rng(seed)
    draws = [
        alpha(counts[rng.integers(0, len(counts), len(counts))], domain, level) for _ in range(resamples)
    ]
    kept = [d for d in draws if d is not None]
    interval = (
        [float(q) for q in np.percentile(kept, [2.5, 97.5])] if kept and point is not None else [None, None]
    )
    return {
        "alpha": point,
        "low": interval[0],
        "high": interval[1],
        "items": len(counts),
        "values": int(counts.sum()),
    }


# ----- consensus per item ----------------------------------------------------------------------------


@dataclass
class Consensus:
    """What an item's raters say together. `label`: the sign of the mean rating (positive, negative, zero)
    or the modal label; `share`: the raters agreeing with it (for a sign, a rating of 0 counts half, as
    data.min_agreement reads it). `std` is the ratings' spread (population std, as the VADER files give it);
    `stderr` the mean's standard error (sample std / sqrt(n))."""

    n: int
    label: str
    share: float
    mean: float | None = None
    stderr: float | None = None
    median: float | None = None
    std: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sign_label(value: float) -> str:
    return POSITIVE if value > 0 else NEGATIVE if value < 0 else ZERO


def rating_consensus(ratings: Sequence[float]) -> Consensus:
    mean = statistics.fmean(ratings)
    label = sign_label(mean)
    if label == ZERO:
        share = sum(r == 0 for r in ratings) / len(ratings)
    else:
        share = side_share(list(ratings), 1 if label == POSITIVE else -1)
    stderr = statistics.stdev(ratings) / math.sqrt(len(ratings)) if len(ratings) > 1 else None
    return Consensus(
        len(ratings), label, share, mean, stderr, statistics.median(ratings), statistics.pstdev(ratings)
    )


def label_consensus(labels: Sequence[Value]) -> Consensus:
    """The modal label (the first seen among equals) and the share of raters who gave it."""
    label, count = Counter(labels).most_common(1)[0]
    return Consensus(len(labels), str(label), count / len(labels))


def consensus(values: Sequence[Value], numeric: bool) -> Consensus:
    return rating_consensus(values) if numeric else label_consensus(values)  # type: ignore[arg-type]


def consensus_summary(agreed: list[Consensus]) -> dict[str, Any]:
    """How far each item's raters agree with its label, and (ratings) how spread their ratings are."""
    shares = [c.share for c in agreed]
    out: dict[str, Any] = {
        "share_mean": statistics.fmean(shares),
        "share_median": statistics.median(shares),
        "below_0.7": sum(s < 0.7 for s in shares),
        "labels": dict(Counter(c.label for c in agreed)),
    }
    spreads = [c.std for c in agreed if c.std is not None and c.n > 1]
    if spreads:
        counts, edges = np.histogram(spreads, bins=20)
        out["spread"] = {
            "mean": statistics.fmean(spreads),
            "median": statistics.median(spreads),
            "p90": float(np.percentile(spreads, 90)),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        }
    return out


def oriented_votes(votes: list[float], first: str, second: str) -> list[float]:
    """A pair's votes (+1: first side) counted for the side a hash of its two texts picks. Counted for the
    data's `chosen`, often the winning side of every pair, every item would lean the same way and alpha would
    read near 0 however well the raters agree."""
    flip = zlib.crc32(first.encode()) < zlib.crc32(second.encode())
    return [-v for v in votes] if flip else votes


# ----- named raters: bias, scale, agreement, Dawid-Skene ----------------------------------------------


def modified_z(values: dict[str, float]) -> dict[str, float]:
    """Each value's distance from the median in robust units: 0.6745 (x - median) / MAD, or
    (x - median) / (1.2533 mean absolute deviation) when the MAD is 0 (Iglewicz & Hoaglin; IBM's rule)."""
    numbers = list(values.values())
    median = statistics.median(numbers)
    mad = statistics.median(abs(x - median) for x in numbers)
    scale = mad / 0.6745 if mad > 0 else 1.2533 * statistics.fmean(abs(x - median) for x in numbers)
    return {k: (x - median) / scale if scale > 0 else 0.0 for k, x in values.items()}


def rater_scores(own: list[float], others: list[float]) -> dict[str, float | None]:
    """One rater against the mean of the other raters of the same items: bias (mean offset) with its standard
    error, scale (slope of the rater's rating on that consensus) and their Pearson correlation."""
    a, b = np.asarray(own), np.asarray(others)
    bias = float(np.mean(a - b))
    bias_stderr = float(np.std(a - b, ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None
    scale = float(np.cov(a, b)[0, 1] / np.var(b, ddof=1)) if np.ptp(b) > 0 else None
    correlation = float(np.corrcoef(a, b)[0, 1]) if np.ptp(a) > 0 and np.ptp(b) > 0 else None
    return {"bias": bias, "bias_stderr": bias_stderr, "scale": scale, "correlation": correlation}


def rater_quality(marks: Sequence[tuple[str, str, Value]], numeric: bool) -> dict[str, Any]:
    """Named raters' marks (item, rater, value) against the consensus of the item's other raters (leave the
    rater out, so a rater never agrees with itself): agreement with their label, and for ratings bias,
    scale and correlation. Raters whose correlation (labels: agreement) is low, or whose bias is extreme,
    against the other raters' (modified z-score past OUTLIER_Z, or a negative correlation) are flagged."""
    by_item: dict[str, list[tuple[str, Value]]] = defaultdict(list)
    for item, rater, value in marks:
        by_item[item].append((rater, value))
    own: dict[str, list[float]] = defaultdict(list)
    others: dict[str, list[float]] = defaultdict(list)
    agrees: dict[str, list[bool]] = defaultdict(list)
    for item_marks in by_item.values():
        for i, (rater, value) in enumerate(item_marks):
            rest = [v for j, (_, v) in enumerate(item_marks) if j != i]
            if not rest:
                continue
            together = consensus(rest, numeric)
            if numeric:
                own[rater].append(float(value))  # type: ignore[arg-type]
                others[rater].append(together.mean or 0.0)
            agrees[rater].append((sign_label(value) if numeric else str(value)) == together.label)  # type: ignore[arg-type]
    raters = []
    for rater in sorted(agrees):
        entry: dict[str, Any] = {"rater": rater, "items": len(agrees[rater])}
        entry["agreement"] = statistics.fmean(agrees[rater])
        if numeric:
            entry |= rater_scores(own[rater], others[rater])
        raters.append(entry)
    flagged = flag_raters([r for r in raters if r["items"] >= MIN_RATER_ITEMS], numeric)
    for entry in raters:
        entry["flags"] = flagged.get(entry["rater"], [])
    measure = "correlation" if numeric else "agreement"
    raters.sort(key=lambda r: (r[measure] is None, r[measure] if r[measure] is not None else 0.0))
    return {"raters": raters, "flagged": sorted(flagged), "ranked_by": measure}


def flag_raters(raters: list[dict[str, Any]], numeric: bool) -> dict[str, list[str]]:
    """Why each outlying rater stands out; nothing when too few raters to tell a typical one. A bias counts
    when it is also more than 3 of its own standard errors from the typical rater's (not noise)."""
    flags: dict[str, list[str]] = defaultdict(list)
    if len(raters) < MIN_RATERS_TO_FLAG:
        return flags
    measure = "correlation" if numeric else "agreement"
    known = {r["rater"]: r[measure] for r in raters if r[measure] is not None}
    for rater, z in modified_z(known).items():
        if z < -OUTLIER_Z or (numeric and known[rater] < 0):
            flags[rater].append(f"low {measure} with the consensus ({known[rater]:.2f})")
    if numeric:
        biases = {r["rater"]: r["bias"] for r in raters}
        typical, noise = (
            statistics.median(biases.values()),
            {r["rater"]: r["bias_stderr"] or 0.0 for r in raters},
        )
        for rater, z in modified_z(biases).items():
            if abs(z) > OUTLIER_Z and abs(biases[rater] - typical) > 3 * noise[rater]:
                flags[rater].append(f"biased ({biases[rater]:+.2f} from the consensus)")
    return dict(flags)


def dawid_skene(marks: Sequence[tuple[str, str, str]], majority: dict[str, str]) -> dict[str, Any]:
    """Dawid-Skene (crowd-kit) on categorical marks (item, rater, label): each item's most likely label and
    its posterior, each rater's accuracy (the chance their label is the true one, over the estimated class
    priors), and how often the model's label is the item's consensus label (`majority`)."""
    import pandas as pd
    from crowdkit.aggregation import DawidSkene

    frame = pd.DataFrame(list(marks), columns=["task", "worker", "label"])
    model: Any = DawidSkene(n_iter=100).fit(frame)
    labels, posterior = model.labels_, model.probas_.max(axis=1)
    errors, priors = model.errors_, model.priors_
    accuracy = {}
    for worker in sorted(frame["worker"].unique()):
        observed = errors.loc[worker]
        accuracy[str(worker)] = float(
            sum(priors[k] * observed.loc[k, k] for k in priors.index if k in observed.index)
        )
    same = [str(labels[item]) == label for item, label in majority.items() if item in labels.index]
    return {
        "labels": {str(k): str(v) for k, v in labels.items()},
        "posterior": {str(k): float(v) for k, v in posterior.items()},
        "rater_accuracy": accuracy,
        "agrees_with_consensus": statistics.fmean(same) if same else None,
        "mean_posterior": float(posterior.mean()),
    }


# ----- what a model would learn besides quality ----------------------------------------------------------


def training_label(together: Consensus, form: str, above: float, below: float) -> bool | None:
    """An item's label as training reads it (True: desirable, None: neither): a mean rating above `above` or
    below `below` (data.desirable_above, undesirable_below), the side that won a pair's votes (True: chosen),
    the name of a modal label (good/bad, true/false, ...)."""
    if form == "labels":
        return LABEL_NAMES.get(together.label.lower())
    mean = together.mean or 0.0
    if form == "votes":
        above = below = 0.0
    return True if mean > above else False if mean < below else None


def label_balance(labels: Sequence[bool | None], groups: Sequence[str], flag: bool = True) -> dict[str, Any]:
    """Desirable, undesirable and unlabelled items overall and per group, and the desirable share of the
    labelled ones; flagged when the rarer label is under MINORITY_SHARE of them (`flag`)."""

    def count(chosen: list[bool | None]) -> dict[str, Any]:
        yes, no = chosen.count(True), chosen.count(False)
        share = yes / (yes + no) if yes + no else None
        unbalanced = flag and share is not None and min(share, 1 - share) < MINORITY_SHARE
        return {
            "desirable": yes,
            "undesirable": no,
            "neither": len(chosen) - yes - no,
            "desirable_share": share,
            "flagged": unbalanced,
        }

    per_group: dict[str, list[bool | None]] = defaultdict(list)
    for label, group in zip(labels, groups):
        per_group[group].append(label)
    return {"all": count(list(labels)), "groups": {g: count(v) for g, v in sorted(per_group.items())}}


def mean_gap(a: Sequence[float], b: Sequence[float], paired: bool) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error: of the paired differences, or Welch's for two samples."""
    if paired:
        diffs = [x - y for x, y in zip(a, b)]
        return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(
            diffs
        ) > 1 else None
    if len(a) < 2 or len(b) < 2:
        return statistics.fmean(a) - statistics.fmean(b), None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return statistics.fmean(a) - statistics.fmean(b), se


def length_gap(desirable: Sequence[str], undesirable: Sequence[str], paired: bool = False) -> dict[str, Any]:
    """The length of desirable against undesirable texts, in characters and in words: each side's mean, the
    gap, its standard error and z. A gap past LENGTH_GAP_Z standard errors is flagged: training on it
    teaches length, not quality. `paired`: desirable[i] and undesirable[i] answer the same prompt."""
    out: dict[str, Any] = {"desirable": len(desirable), "undesirable": len(undesirable), "flagged": False}
    if not desirable or not undesirable:
        return out
    for unit, measure in (("chars", len), ("words", lambda t: len(t.split()))):
        a, b = [float(measure(t)) for t in desirable], [float(measure(t)) for t in undesirable]
        gap, se = mean_gap(a, b, paired)
        z = gap / se if se else (0.0 if gap == 0 else math.inf)
        out[unit] = {
            "desirable_mean": statistics.fmean(a),
            "undesirable_mean": statistics.fmean(b),
            "gap": gap,
            "stderr": se,
            "z": z if math.isfinite(z) else None,
        }
        out["flagged"] = out["flagged"] or abs(z) > LENGTH_GAP_Z
    return out


def normalise(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: texts that differ only in these are near
    duplicates."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def duplicates(texts: Sequence[str], splits: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """Texts repeated exactly, or nearly (the same once normalised), within and across the train and test
    splits; any across them is flagged (the held-out score then partly measures memory). `names` identify
    the texts in the examples given."""
    out: dict[str, Any] = {}
    for kind, key in (("exact", lambda t: t), ("near", normalise)):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(texts):
            groups[key(text)].append(i)
        repeated = [g for g in groups.values() if len(g) > 1]
        across = [g for g in repeated if len({splits[i] for i in g}) > 1]
        out[kind] = {
            "groups": len(repeated),
            "extra_copies": sum(len(g) - 1 for g in repeated),
            "across_splits": len(across),
            "examples": [[names[i] for i in g] for g in across[:5]],
        }
    out["flagged"] = out["exact"]["across_splits"] + out["near"]["across_splits"] > 0
    return out


def concentration(counts: Sequence[int]) -> dict[str, Any]:
    """How much of the data the most prolific raters (or prompts) give: the share of all ratings (items)
    from the top 1% of them (at least one) and from the top 10."""
    ordered = sorted(counts, reverse=True)
    total = sum(ordered)
    top_percent = max(1, math.ceil(len(ordered) / 100))
    return {
        "count": len(ordered),
        "total": total,
        "top_1_percent": sum(ordered[:top_percent]) / total,
        "top_1_percent_size": top_percent,
        "top_10": sum(ordered[:10]) / total,
    }


def findings(found: dict[str, Any], raters: list[dict[str, Any]]) -> list[str]:
    """One line per check that found something: `found` holds the checks' results (balance, length per
    group, duplicates), `raters` each named rater's entry with its flags."""
    lines = []
    balance = found["balance"]
    for group, counts in {"all": balance["all"], **balance["groups"]}.items():
        if counts["flagged"]:
            lines.append(
                f"label balance ({group}): {counts['desirable_share']:.0%} of the labelled items desirable"
            )
    for group, length in found["length"].items():
        if length["flagged"]:
            chars, words, z = length["chars"]["gap"], length["words"]["gap"], length["chars"]["z"]
            lines.append(
                f"length ({group}): desirable texts are {abs(chars):.1f} characters ({abs(words):.1f} words) "
                f"{'longer' if chars > 0 else 'shorter'} on average, "
                + (f"z = {z:.1f}" if z is not None else "every one")
            )
    copies = found["duplicates"]
    if copies["flagged"]:
        lines.append(
            f"duplicates across train and test: {copies['exact']['across_splits']} exact, "
            f"{copies['near']['across_splits']} near (the same once normalised, exact ones included)"
        )
    lines += [f"rater {r['rater']}: " + "; ".join(r["flags"]) for r in raters if r["flags"]]
    return lines


# ----- AI judges against the human consensus ----------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions (Spearman's convention)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and np.ptp(a) > 0 and np.ptp(b) > 0 else None


def judge_agreement(scores: Sequence[float], human: Sequence[float]) -> dict[str, Any]:
    """A judge's scores against the human consensus of the same items: Pearson and Spearman correlations,
    and the share of items where both have the same sign (among those where neither is 0)."""
    a, b = np.asarray(scores, dtype=float), np.asarray(human, dtype=float)
    signed = (a != 0) & (b != 0)
    same = np.sign(a[signed]) == np.sign(b[signed])
    return {
        "items": len(a),
        "pearson": pearson(a, b),
        "spearman": pearson(average_ranks(a), average_ranks(b)),
        "sign_agreement": float(same.mean()) if signed.any() else None,
        "signed_items": int(signed.sum()),
    }


def calibration_curve(
    scores: Sequence[float], human: Sequence[float], bins: int = 10
) -> list[dict[str, Any]]:
    """Judge scores in `bins` equal-width bins over their range; per bin the mean judge score, the mean
    human consensus with its standard error, and the count (empty bins left out)."""
    a, b = np.asarray(scores, dtype=float), np.asarray(human, dtype=float)
    edges = np.linspace(a.min(), a.max(), bins + 1) if np.ptp(a) > 0 else np.array([a.min(), a.max()])
    which = np.clip(np.searchsorted(edges, a, side="right") - 1, 0, len(edges) - 2)
    curve = []
    for i in range(len(edges) - 1):
        inside = b[which == i]
        if not len(inside):
            continue
        se = float(inside.std(ddof=1) / math.sqrt(len(inside))) if len(inside) > 1 else None
        curve.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "judge_mean": float(a[which == i].mean()),
                "human_mean": float(inside.mean()),
                "human_stderr": se,
                "items": len(inside),
            }
        )
    return curve
