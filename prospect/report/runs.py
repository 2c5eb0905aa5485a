"""What a report reads from a run directory, as prospect writes it: the step metrics (metrics.jsonl), the
held-out evaluations before and after training (eval_before.json and eval_after.json, whose samples answer
the same prompts twice; report.json once both are done), the evaluations during training (evals.jsonl) and
the recipe (config.yaml).

The JSON files are written atomically. The two logs are appended to, so while a run is going its last line
may be cut short: that line is left out; a bad line anywhere else is an error."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from prospect.errors import UserError, shown
from prospect.io import read_json
from prospect.recipe import MARKER

NOT_CURVES = ("step", "best", "skipped")


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Point:
    """One checkpoint on the judged score / KL plane."""

    label: str  # "before", "step 50", "after"
    step: int
    score: float
    score_se: float
    kl: float
    kl_se: float


@dataclass
class SamplePair:
    """One held-out prompt answered by two models (before and after training, or a baseline and a checkpoint)."""

    prompt: str
    left: str
    left_score: float | None
    right: str
    right_score: float | None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: "loss.name" -> "kto"
    curves: dict[str, Curve]
    evals: list[dict[str, Any]]  # evals.jsonl
    before: dict[str, Any] | None  # the evaluation's numbers (HeldOutResult or RewardEval), without samples
    after: dict[str, Any] | None
    samples: list[SamplePair]
    name: str = ""  # how the report calls it: the directory's name, or its path when two runs share a name

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("loss.name", "unknown"))

    @property
    def judge(self) -> str:
        return str(self.config.get("eval.judge", "judge"))

    def judge_change(self) -> tuple[float, float] | None:
        """(after - before, its standard error) of the held-out judge's mean: independent samples, so the
        errors add in quadrature."""
        b, a = self.before or {}, self.after or {}
        if not (is_number(b.get("judge_mean")) and is_number(a.get("judge_mean"))):
            return None
        spread = math.hypot(b.get("judge_stderr") or 0.0, a.get("judge_stderr") or 0.0)
        return a["judge_mean"] - b["judge_mean"], spread

    @property
    def last_step(self) -> int:
        steps = [c.steps[-1] for c in self.curves.values() if c.steps] + [int(r["step"]) for r in self.evals]
        return max(steps, default=0)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log with a "step" each; a last line cut short (the run is writing it) is
    left out."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f'{path}:{number}: expected an object with an integer "step", got {shown(line)}')
        records.append(record)
    return records


def is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves(records: list[dict[str, Any]]) -> dict[str, Curve]:
    """metric -> its finite values against steps, in the order metrics first appear. A metric with no
    example in a step (NaN) has no point there."""
    out: dict[str, Curve] = {}
    for record in records:
        for key, value in record.items():
            if key in NOT_CURVES or not is_number(value):
                continue
            curve = out.setdefault(key, Curve())
            curve.steps.append(record["step"])
            curve.values.append(float(value))
    return out


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numbers_of(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "samples"}


def held_out(path: Path, when: str) -> dict[str, Any] | None:
    """The evaluation `when` ("before" or "after") training, with its samples: eval_<when>.json, else the
    summary in report.json."""
    own = path / f"eval_{when}.json"
    if own.is_file():
        result = read_json(own)
    elif (path / "report.json").is_file():
        report = read_json(path / "report.json")
        result = report.get(when) if isinstance(report, dict) else None
    else:
        return None
    if not isinstance(result, dict):
        raise UserError(f"{path}: the evaluation {when} training is not an object")
    return result


def pair_samples(left: list[dict[str, Any]], right: list[dict[str, Any]]) -> list[SamplePair]:
    """The prompts both lists answered, in the left list's order; a prompt asked twice pairs in order."""
    answers: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
    for sample in right:
        answers[str(sample.get("prompt", ""))].append(sample)
    pairs = []
    for sample in left:
        prompt = str(sample.get("prompt", ""))
        if answers[prompt]:
            other = answers[prompt].popleft()
            pairs.append(
                SamplePair(
                    prompt,
                    str(sample.get("completion", "")),
                    sample.get("score"),
                    str(other.get("completion", "")),
                    other.get("score"),
                )
            )
    return pairs


def read_config(path: Path) -> dict[str, Any]:
    """A run directory's config.yaml, flattened ({} without one)."""
    if not (path / "config.yaml").is_file():
        return {}
    try:
        return flatten(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path / 'config.yaml'}: not a readable recipe ({type(exc).__name__})") from None


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not (path / MARKER).is_file():
        raise UserError(f"{path}: not a prospect run directory (no {MARKER})")
    config = read_config(path)
    before, after = held_out(path, "before"), held_out(path, "after")
    samples = []
    if before and after:
        samples = pair_samples(before.get("samples") or [], after.get("samples") or [])
    return Run(
        path=path,
        config=config,
        curves=curves(read_log(path / "metrics.jsonl")),
        evals=read_log(path / "evals.jsonl"),
        before=numbers_of(before) if before else None,
        after=numbers_of(after) if after else None,
        samples=samples,
    )


def point(label: str, step: int, result: dict[str, Any]) -> Point | None:
    """A point when the evaluation has a judged score and a KL."""
    keys = ("judge_mean", "judge_stderr", "kl_mean", "kl_stderr")
    if not all(is_number(result.get(k)) for k in keys):
        return None
    score, score_se, kl, kl_se = (float(result[k]) for k in keys)
    return Point(label, step, score, score_se, kl, kl_se)


def frontier_points(run: Run) -> list[Point]:
    """Before training (step 0), each evaluation during training, and after training (its last step: an
    evaluation at that step is the same one)."""
    last = run.last_step
    found = [point("before", 0, run.before) if run.before else None]
    found += [
        point(f"step {r['step']}", r["step"], r) for r in run.evals if r["step"] != last or not run.after
    ]
    found.append(point("after", last, run.after) if run.after else None)
    return [p for p in found if p is not None]


def score_at_kl(points: list[Point], kl: float) -> tuple[float, float] | None:
    """The judged score at `kl` nats and its standard error: linear interpolation between the first two
    consecutive checkpoints (in training order) whose KLs bracket `kl`; the error from theirs, the two
    evaluations being independent samples. None when no consecutive pair brackets it."""
    ordered = sorted(points, key=lambda p: p.step)
    for a, b in itertools.pairwise(ordered):
        if min(a.kl, b.kl) <= kl <= max(a.kl, b.kl):
            w = 0.0 if a.kl == b.kl else (kl - a.kl) / (b.kl - a.kl)
            score = a.score + w * (b.score - a.score)
            return score, math.hypot((1 - w) * a.score_se, w * b.score_se)
    return None


def common_kl_levels(runs_points: list[list[Point]], count: int = 4) -> list[float]:
    """KLs every run reaches: `count` even steps up to the smallest of the runs' largest KLs."""
    tops = [max(p.kl for p in points) for points in runs_points if points]
    if len(tops) < 2 or min(tops) <= 0:
        return []
    # Rounded down to 0.01 nats, so that the last level is never beyond the shortest run's reach.
    return [math.floor(min(tops) * (i + 1) / count * 100) / 100 for i in range(count)]
