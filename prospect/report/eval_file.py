"""The JSON that `prospect eval` writes, read and checked for a report: checkpoints judged on the same held-out
prompts as a baseline, with win rates, KL to the reference, lengths and the judges' agreement.

    {"prompts": {"source", "count"}, "baseline": {"name", "path"}, "judges": [JUDGE, ...],
     "checkpoints": [{"name", "path", "judge": {JUDGE: {"mean", "stderr"}}, "baseline_judge": {...},
        "win_rate": {JUDGE: {"rate", "low", "high", "wins", "ties", "losses"}},
        "lc_win_rate": {JUDGE: {"rate", "low", "high"}}, "kl": {"mean", "stderr"},
        "length": {"mean", "baseline_mean"}, "accuracy": {"mean", "stderr"} | null,
        "samples": [{"prompt", "completion", "baseline", "scores": {JUDGE: x}, "baseline_scores": {...}}]}],
     "agreement": {"A~B": {"verdict_agreement", "spearman"}}}

Anything else in it is ignored; a field of the wrong kind is a one-line error naming it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prospect.errors import UserError, field_error
from prospect.io import read_json
from prospect.report.runs import SamplePair, is_number

Numbers = dict[str, float]


@dataclass
class Checkpoint:
    name: str
    path: str
    judge: dict[str, Numbers]  # judge -> {"mean", "stderr"}
    baseline_judge: dict[str, Numbers]
    win_rate: dict[str, Numbers]  # judge -> {"rate", "low", "high", "wins", "ties", "losses"}
    lc_win_rate: dict[str, Numbers]
    kl: Numbers | None
    length: Numbers | None
    accuracy: Numbers | None
    samples: list[dict[str, Any]] = field(default_factory=list)

    def pairs(self, judge: str) -> list[SamplePair]:
        """Baseline (left) and checkpoint (right) on each prompt, scored by `judge`."""
        return [
            SamplePair(
                str(s.get("prompt", "")),
                str(s.get("baseline", "")),
                (s.get("baseline_scores") or {}).get(judge),
                str(s.get("completion", "")),
                (s.get("scores") or {}).get(judge),
            )
            for s in self.samples
        ]


@dataclass
class EvalFile:
    path: Path
    source: str
    count: int
    baseline: str
    judges: list[str]
    checkpoints: list[Checkpoint]
    agreement: dict[str, Numbers]


class Reader:
    """Checks fields, naming the file and where in it a bad one is."""

    def __init__(self, path: Path):
        self.path = path

    def obj(self, value: Any, where: str, key: str, optional: bool = False) -> dict[str, Any] | None:
        inner = value.get(key) if isinstance(value, dict) else None
        if inner is None and optional:
            return None
        if not isinstance(inner, dict):
            raise field_error(f"{self.path}: {where}", key, "an object", inner)
        return inner

    def text(self, value: dict[str, Any], where: str, key: str) -> str:
        inner = value.get(key, "")
        if not isinstance(inner, str):
            raise field_error(f"{self.path}: {where}", key, "a string", inner)
        return inner

    def numbers(
        self,
        value: dict[str, Any] | None,
        where: str,
        required: tuple[str, ...],
        optional: tuple[str, ...] = (),
    ) -> Numbers | None:
        """{key: number} for the keys of `required` (each present) and of `optional`. A number left undefined
        (null or NaN: a constant judge's correlation, a win rate with no readable verdict) is left out."""
        if value is None:
            return None
        for key in (*required, *optional):
            if key not in value and key in optional:
                continue
            given = value.get(key)
            undefined = key in value and (given is None or (isinstance(given, float) and math.isnan(given)))
            if not (undefined or is_number(given)):
                raise field_error(f"{self.path}: {where}", key, "a number or null", given)
        return {k: float(value[k]) for k in (*required, *optional) if is_number(value.get(k))}

    def per_judge(
        self,
        value: dict[str, Any],
        where: str,
        key: str,
        required: tuple[str, ...],
        optional: tuple[str, ...] = (),
    ) -> dict[str, Numbers]:
        """{judge: numbers} from value[key] (absent: no judge)."""
        table = self.obj(value, where, key, optional=True) or {}
        return {
            judge: self.numbers(
                self.obj(table, f"{where}.{key}", judge), f"{where}.{key}.{judge}", required, optional
            )
            or {}
            for judge in table
        }


ESTIMATE = ("mean", "stderr")
RATE = ("rate", "low", "high")
COUNTS = ("wins", "ties", "losses")
AGREEMENT = ("verdict_agreement", "spearman")


def checkpoint(read: Reader, raw: Any, where: str) -> Checkpoint:
    if not isinstance(raw, dict):
        raise UserError(f"{read.path}: {where}: expected an object, got {type(raw).__name__}")
    samples = raw.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise field_error(f"{read.path}: {where}", "samples", "a list of objects")
    return Checkpoint(
        name=read.text(raw, where, "name") or f"checkpoint {where}",
        path=read.text(raw, where, "path"),
        judge=read.per_judge(raw, where, "judge", ESTIMATE),
        baseline_judge=read.per_judge(raw, where, "baseline_judge", ESTIMATE),
        win_rate=read.per_judge(raw, where, "win_rate", RATE, COUNTS),
        lc_win_rate=read.per_judge(raw, where, "lc_win_rate", RATE),
        kl=read.numbers(read.obj(raw, where, "kl", optional=True), f"{where}.kl", ESTIMATE),
        length=read.numbers(
            read.obj(raw, where, "length", optional=True), f"{where}.length", ("mean",), ("baseline_mean",)
        ),
        accuracy=read.numbers(read.obj(raw, where, "accuracy", optional=True), f"{where}.accuracy", ESTIMATE),
        samples=samples,
    )


def load_eval(path: Path) -> EvalFile:
    if not path.is_file():
        raise UserError(f"{path}: no such eval file (write one with `prospect eval`)")
    data, read = read_json(path), Reader(path)
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: expected a JSON object as `prospect eval` writes, got {type(data).__name__}"
        )
    prompts = read.obj(data, "top level", "prompts", optional=True) or {}
    baseline = read.obj(data, "top level", "baseline", optional=True) or {}
    judges = data.get("judges", [])
    if not isinstance(judges, list) or not all(isinstance(j, str) for j in judges):
        raise field_error(f"{path}: top level", "judges", "a list of judge names", judges)
    raw = data.get("checkpoints")
    if not isinstance(raw, list) or not raw:
        raise field_error(f"{path}: top level", "checkpoints", "a non-empty list", raw)
    agreement = read.obj(data, "top level", "agreement", optional=True) or {}
    count = prompts.get("count", 0)
    return EvalFile(
        path=path,
        source=read.text(prompts, "prompts", "source"),
        count=int(count) if is_number(count) else 0,
        baseline=read.text(baseline, "baseline", "name") or "baseline",
        judges=judges,
        checkpoints=[checkpoint(read, c, f"checkpoints[{i}]") for i, c in enumerate(raw)],
        agreement={
            pair: read.numbers(read.obj(agreement, "agreement", pair), f"agreement.{pair}", (), AGREEMENT)
            or {}
            for pair in agreement
        },
    )
